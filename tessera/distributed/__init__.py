"""Several ranks on torch.distributed (gloo on CPU, NCCL on GPU).

- group.py: process-group setup and the control channel (each step's batch, rank 0 -> workers);
- launch.py: worker processes started by the engine (spawn), or torchrun's ranks; watchdog, shutdown;
- worker.py: what a rank other than 0 runs (its model shard, the step loop);
- tensor_parallel.py: heads and the MLP split across ranks, one all-reduce per block (a LinearMethod);
- zigzag.py, ring_attention.py: the sequence-parallel attention schedules (ring, TokenRing);
- sequence_parallel.py: long prefills split across ranks (an attention backend + a runner);
- comm_model.py: a step-time model of ring vs TokenRing on a given interconnect.
"""
