"""Every teacher by name, with its own typed settings: adding a teacher is its module and one line here.

In a config a teacher is its name alone (`teacher: expert`) or its settings (`teacher: {name: llm, backend: ...}`).
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field

from steptune.teacher.base import TeacherSettings
from steptune.teacher.expert import ExpertSettings
from steptune.teacher.llm import LLMSettings, SelfSettings
from steptune.teacher.mc import MCSettings

TEACHERS: dict[str, type[TeacherSettings]] = {
    "expert": ExpertSettings,
    "llm": LLMSettings,
    "self": SelfSettings,
    "mc": MCSettings,
}


def name_alone(value: Any) -> Any:
    """`teacher: mc` in a config means `teacher: {name: mc}`."""
    return {"name": value} if isinstance(value, str) else value


# the settings of any registered teacher, told apart by `name`
AnyTeacher = Annotated[Union[tuple(TEACHERS.values())], BeforeValidator(name_alone),  # noqa: UP007
                       Field(discriminator="name")]
