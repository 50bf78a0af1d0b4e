"""Parameter models shared by the plugin base classes."""

from pydantic import BaseModel, ConfigDict


class NoParams(BaseModel):
    """The parameters of a contribution that takes none: any key is an error."""

    model_config = ConfigDict(extra="forbid")
