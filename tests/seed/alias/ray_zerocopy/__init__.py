"""Import alias: the seed library's tests run against modelwrapper unchanged."""

from modelwrapper import *  # noqa: F401,F403
from modelwrapper import ModelWrapper  # noqa: F401
