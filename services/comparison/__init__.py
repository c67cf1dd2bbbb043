"""`dopd bench compare` and `dopd reach`: the modes against each other on one workload, in virtual
time (services/simulate) or on the real services (`dopd bench` against clusters the launcher
brings up). A tool above both the benchmark harness (services/bench) and the simulator, which
import nothing of it: services/cli.py hands its arguments and its run to `dopd bench`."""
