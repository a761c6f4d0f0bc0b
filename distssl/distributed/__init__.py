"""What crosses processes: the collectives (written once, in collectives.py), the process group and
the peer watch (peers.py), preemption (preempt.py) and the /proc facts they rest on (procs.py)."""
