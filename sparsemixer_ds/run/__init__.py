"""What a run is made of, around the training loop (train.py).

    rundir.py       the run directory: every path of a run, and the rules for reusing one
    checkpoints.py  the checkpoint store: save, verify, choose, keep-N, set aside, restore
    resume.py       the resume policy: what a resumed run may change, and how it is said
    checksums.py  checkpoint checksums, computed collectively and verified before a resume
    runlock.py    one run per run directory: the LOCK, who holds it, taking over a dead run's
    stop.py       stopping on SIGTERM/SIGINT/SIGHUP or a lost launcher: the step, a checkpoint, a deadline
    watchdog.py   every rank's heartbeat: a stopped or hanging rank ends the job, named
    comm.py       the process group: MPI discovery, rendezvous timeout, shared-memory clean-up
    metrics.py    metrics.jsonl, DeepSpeed's monitors, throughput, MFU, peak memory
    plots.py      the end-of-run plot
    optim.py      AdamW that skips non-finite steps, its parameter groups, warm-up + cosine
    machine.py    what this machine can run: the precision, and memory against the model's estimate
"""
