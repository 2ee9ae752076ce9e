"""Celery side of renderq. `celery -A tasks` finds the app in tasks/celery.py; importing
this package has no side effects."""
