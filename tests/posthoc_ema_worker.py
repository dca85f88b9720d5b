"""Run by test_posthoc_ema.py under torchrun (2 CPU processes, gloo): DDP training of a small model with a
PowerFunctionEMA on every process; writes this rank's averages to <out>/rank<N>.pt
(and each rank is given its own snapshot folder, so that a write by the wrong one shows)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uldm.training.posthoc_ema import PowerFunctionEMA  # noqa: E402


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    tracker = PowerFunctionEMA(model, snapshot_dir=out / f"rank{rank}" / "ema_snapshots", snapshot_steps=5,
                               is_main_process=rank == 0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(rank)  # each process its own data
    for step in range(1, 11):
        x = torch.randn(8, 4, generator=generator)
        loss = ((ddp(x) - x.sum(1, keepdim=True).sin()) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tracker.step(ddp.parameters(), step)
    torch.save(tracker.state_dict(), out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
