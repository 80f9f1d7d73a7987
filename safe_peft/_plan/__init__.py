"""Stage 3, planning: every check, comparison, conversion and repair, frozen into one LoadPlan shared by diagnose and
the load."""
