"""tilert: compile a MiMo-V2 model into a validated tile schedule and run it."""

__version__ = "0.1.0"
# Artifacts record the schedule format they were written with; a reader refuses other majors.
SCHEDULE_FORMAT_VERSION = 1
