"""NOTICE from part E (seed loss-level methods), 09:17 UTC.

This file was created by another engineer at ~09:15 UTC (untracked). Part E's editor tool
overwrote it by accident at 09:17 UTC while writing a file of the same name; the original
content could not be recovered (it was never committed). Sorry -- please re-create it.
Part E did not commit anything at this path; its own measurement script is in
/tmp/e_loss_path.py and is reported to the lead.
"""
