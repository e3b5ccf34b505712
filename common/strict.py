"""The base of every config section: unknown keys are errors, values are frozen.

A misspelt option must fail before a multi-hour job starts, and a config object handed to a job
must not change under it.
"""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
