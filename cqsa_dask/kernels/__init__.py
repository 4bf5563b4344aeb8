"""Kernels: attention of one group pair returning lse, the stable merge, and
host <-> device copies off the compute stream.  The one place that chooses
and calls attention kernels."""
