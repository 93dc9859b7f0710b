"""Errors that reach the user as one clear message (the CLI prints them without a traceback)."""


class SdpoError(Exception):
    """Base class: the message names the file, row or key and what is wrong."""


class DataError(SdpoError):
    """Input data cannot be used (missing column, not parquet, empty input, unusable shards...)."""


class ModelError(SdpoError):
    """A model folder or weights file is missing, incomplete or of the wrong family."""


class TrainingError(SdpoError):
    """Training cannot continue (non-finite loss or gradient, incompatible checkpoint...)."""
