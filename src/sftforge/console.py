from tqdm.auto import tqdm

from sftforge.training.distributed import world_from_environment


def progress_bar(iterable, description: str, total: int | None = None, unit: str = "it"):
    """A transient progress bar for a phase that may take a while (evaluation, generation),
    shown by the main process only: rank 0 under torchrun, or a process alone."""
    return tqdm(
        iterable, description, total=total, unit=unit, leave=False, dynamic_ncols=True,
        disable=not world_from_environment().is_main,
    )  # fmt: skip
