"""Train a span-extraction QA model data-parallel: config → distributed init → Trainer → train → close.

One process (CPU or one GPU):
    python launcher/train.py --model SpanBERT/spanbert-base-cased --head span --preset spanbert \\
        --train_file train-v2.0.json --dev_file dev-v2.0.json --output_dir runs/span
Many processes on one machine (one per GPU; on a machine without GPUs, CPU processes with gloo):
    deepspeed --num_gpus 8 launcher/train.py --deepspeed_config ds_configs/bf16_zero1.json ...
    torchrun --nproc_per_node 8 launcher/train.py ...
Many nodes (no ssh between them under SLURM: one task per GPU started by srun, see slurm/train.sbatch):
    deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 launcher/train.py ...
    torchrun --nnodes 2 --node_rank N --nproc_per_node 8 --master_addr HOST0 --master_port 29500 \\
        launcher/train.py ...
Resume after a stop or a preemption: the same command with `--resume auto`.
Installed without this checkout (`pip install spanqa`), `python -m spanqa.train` is the same script
(`deepspeed --module spanqa.train ...`, `torchrun -m spanqa.train ...`).

Multi-process runs get OMP_NUM_THREADS=1 unless it is set (as torchrun does; the deepspeed launcher
does not, and CPU ranks then oversubscribe the cores). `python launcher/train.py --help` lists the flags.
"""

from spanqa.train.entry import run_script

if __name__ == "__main__":
    run_script("launcher/train.py")
