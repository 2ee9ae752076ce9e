"""Texts shown to people: block explanations and public error messages, in en and ru."""
from __future__ import annotations

BLOCK_MESSAGES = {
    "CONTENT_SAFETY_VIOLATION": {
        "ru": "🚫 К сожалению, это изображение не может быть обработано по соображениям безопасности. "
              "Пожалуйста, выберите другое фото.",
        "en": "🚫 Sorry, this image cannot be processed for safety reasons. Please choose another photo.",
    },
    "COPYRIGHT_VIOLATION": {
        "ru": "🚫 Изображение не может быть обработано из-за нарушения авторских прав. "
              "Пожалуйста, используйте другое изображение.",
        "en": "🚫 This image cannot be processed because it infringes copyright. Please use another image.",
    },
    "SAFETY_AGREEMENT_REQUIRED": {
        "ru": "🚫 Необходимо согласие с правилами безопасности. "
              "Пожалуйста, ознакомьтесь с правилами и подтвердите согласие.",
        "en": "🚫 You need to accept the safety rules. Please read the rules and confirm your agreement.",
    },
}

GENERATOR_UNAVAILABLE = {
    "en": "Sorry, the generation server is unavailable",
    "ru": "Извините, сервер по генерации не доступен",
}

INVALID_INPUT = {
    "en": "The generator could not process this input; check the photo, the style and the prompt.",
    "ru": "Генератор не смог обработать эти данные; проверьте фото, стиль и описание.",
}

# Error codes a job can fail with because of what the user sent, rather than the generator's health.
INPUT_ERROR_CODES = frozenset({"INVALID_INPUT"})


def block_message(code: str, locale: str) -> str:
    texts = BLOCK_MESSAGES.get(code)
    if texts is None:
        return "🚫 " + code
    return texts.get(locale, texts["en"])


def public_error(code: str, locale: str) -> dict:
    """What a person sees for a failed job: never the internal detail."""
    if code in INPUT_ERROR_CODES:
        return {"code": code, "message": INVALID_INPUT.get(locale, INVALID_INPUT["en"])}
    return {"code": "GENERATOR_UNAVAILABLE", "message": GENERATOR_UNAVAILABLE.get(locale, GENERATOR_UNAVAILABLE["en"])}
