"""Calibration: kernels (StEFCal solvers, SumThreshold flagger) and, later, the cal daemon."""
