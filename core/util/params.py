"""Parameter models shared by the plugin base classes."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

#: A whole number above 0 written as one: pydantic would read ``true`` as 1 and ``"2"`` as 2.
Count = Annotated[StrictInt, Field(gt=0)]


class NoParams(BaseModel):
    """The parameters of a contribution that takes none: any key is an error."""

    model_config = ConfigDict(extra="forbid")
