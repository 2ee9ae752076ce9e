"""Where uploads and results live, by key: PostgreSQL (the default), a directory, or an
S3-compatible bucket.

PostgreSQL works across hosts with no shared disk and no other service, and its bytes are
written by the statements that make and finish jobs: a photo exists exactly when its job does,
and a result is written by the statement that finishes the job, so an attempt that lost its
claim writes nothing.
A directory (STORAGE_BACKEND=filesystem, under MEDIA_ROOT) suits one host or a shared volume;
a bucket (STORAGE_BACKEND=s3) suits many hosts and large volumes. Their writes happen at once,
so each attempt writes a key of its own and deletes only that.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable, Protocol

from sqlalchemy import LargeBinary, bindparam, delete, select, text

from renderq.db import db
from renderq.models import Blob
from renderq.runtime import s3_client, settings


class StorageUnavailable(Exception):
    """The store could not be reached or refused the request (not: the key is absent)."""


class Storage(Protocol):
    # The store is the database: the statements that make and finish jobs write the bytes
    # themselves, and put and delete join the caller's transaction.
    transactional: bool

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes:
        """The bytes under `key`; KeyError if there are none."""

    def delete(self, keys: Iterable[str]) -> None: ...


# Text: SQLAlchemy's PostgreSQL INSERT ... ON CONFLICT construct stays out of its statement
# cache and would be compiled again on every put.
_UPSERT_BLOB = text("INSERT INTO blobs (key, data) VALUES (:key, :data) "
                    "ON CONFLICT (key) DO UPDATE SET data = excluded.data").bindparams(
    bindparam("data", type_=LargeBinary))


class PostgresStorage:
    transactional = True

    def put(self, key: str, data: bytes) -> None:
        db.session.connection().execute(_UPSERT_BLOB, {"key": key, "data": data})

    def get(self, key: str) -> bytes:
        data = db.session.execute(select(Blob.data).where(Blob.key == key)).scalar()
        if data is None:
            raise KeyError(key)
        return data

    def delete(self, keys: Iterable[str]) -> None:
        db.session.execute(delete(Blob).where(Blob.key.in_(list(keys))))


class FilesystemStorage:
    transactional = False

    def __init__(self, root: str):
        self.root = root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def put(self, key: str, data: bytes) -> None:
        """Written atomically, so a reader never sees half a file."""
        target = self._path(key)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".partial-")
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise KeyError(key) from None

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            try:
                os.remove(self._path(key))
            except FileNotFoundError:
                pass


class S3Storage:
    """One object per key in an S3-compatible bucket. Credentials come from boto3's usual chain
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role)."""

    transactional = False
    DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes

    def __init__(self, client: Any, bucket: str):
        self.client = client
        self.bucket = bucket

    def put(self, key: str, data: bytes) -> None:
        self._call("put_object", Bucket=self.bucket, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise KeyError(key) from None
            raise StorageUnavailable("S3 get_object failed: %s" % error) from None
        except Exception as error:
            raise StorageUnavailable("S3 get_object failed: %s" % error) from None

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for start in range(0, len(keys), self.DELETE_BATCH):
            objects = [{"Key": key} for key in keys[start:start + self.DELETE_BATCH]]
            answer = self._call("delete_objects", Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
            if answer.get("Errors"):
                raise StorageUnavailable("S3 could not delete %d object(s), first: %s"
                                         % (len(answer["Errors"]), answer["Errors"][0]))

    def check(self) -> None:
        """Raises StorageUnavailable unless the bucket is there and these credentials reach it."""
        self._call("head_bucket", Bucket=self.bucket)

    def _call(self, operation: str, **arguments: Any) -> Any:
        try:
            return getattr(self.client, operation)(**arguments)
        except Exception as error:  # botocore's connection, credential and client errors alike
            raise StorageUnavailable("S3 %s failed: %s" % (operation, error)) from None


def storage() -> Storage:
    config = settings()
    if config.storage_backend == "filesystem":
        return FilesystemStorage(config.media_root)
    if config.storage_backend == "s3":
        return S3Storage(s3_client(), config.s3_bucket)
    return PostgresStorage()


def result_key(job_id: object, lease_token: object) -> str:
    """A result's key: one per attempt, so an attempt never overwrites or deletes another's."""
    return "results/%s/%s.png" % (job_id, lease_token)
