"""The ground floor every package stands on: files and objects that appear only complete.

- ``atomic``: local files written under a temporary sibling name, then renamed (mode as a new file's).
- ``store``: any URL through fsspec (a path, s3://, gs://, az://), its retries, its one error type, and
  ``atomic_write``, which publishes a local file through ``atomic`` and an object only when its upload
  completes.
- ``cache``: a node's bounded local copy of remote shards, checked on every open.
"""
