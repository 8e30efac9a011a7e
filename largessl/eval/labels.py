"""An evaluation's two splits must mean the same classes by the same labels.

A sample's label is a position in its own dataset's class list (dataset.json "classes"), so a val split scored
against a train split of other classes, or of the same classes in another order, would count wrong answers as right
and report a number that means nothing. Every evaluation (k-NN, linear, attentive, fine-tuning, few-shot, and the
k-NN monitor and top-1 of a training job) compares the two lists by name before any work (`check`):

- two splits of one dataset (one dataset.json), or two lists equal name for name: the labels are used as they are;
- val classes that are all among the train classes, each named once (a named subset, or the same classes in
  another order): each val label is mapped to the train split's position of its class name, and this is said;
- anything else (a val class the train split lacks, a list missing or naming a class twice): refused in one line
  naming what does not match.

`Relabelled` applies the mapping to a loader's batches; labels below 0 (unlabelled samples) pass unchanged, for the
protocols' own refusal.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from largessl.data.index import SplitIndex
from largessl.errors import DataError

SHOWN = 3  # class names quoted in a refusal


def label_map(train: SplitIndex, val: SplitIndex, names: tuple[str, str]) -> tuple[int, ...] | None:
    """For each val label, the train label of the same class; None when the labels agree as they are. `names`
    are the options or keys of (train, val), for the refusal (a DataError)."""
    if train.root == val.root or (train.classes and train.classes == val.classes):
        return None
    train_name, val_name = names
    for name, index in ((train_name, train), (val_name, val)):
        if not index.classes:
            raise DataError(f"{name}: {index.root}'s dataset.json lists no classes, so its labels cannot be matched "
                            f"to {other(names, name)}'s by name (python -m data_tools imagefolder writes the list)")
        if len(set(index.classes)) != len(index.classes):
            twice = next(c for c in index.classes if index.classes.count(c) > 1)
            raise DataError(f"{name}: {index.root}'s dataset.json names class {twice!r} twice")
    position = {name: i for i, name in enumerate(train.classes)}
    unknown = [name for name in val.classes if name not in position]
    if unknown:
        quoted = ", ".join(repr(name) for name in unknown[:SHOWN]) + (f" and {len(unknown) - SHOWN} more"
                                                                       if len(unknown) > SHOWN else "")
        raise DataError(f"{val_name}: {len(unknown)} of its {len(val.classes)} classes are not among {train_name}'s "
                        f"{len(train.classes)} ({quoted}); a label is a position in its own dataset's class list, "
                        "so its top-1 would mean nothing: evaluate on splits of the same classes")
    return tuple(position[name] for name in val.classes)


def other(names: tuple[str, str], name: str) -> str:
    return names[1] if name == names[0] else names[0]


def check(train: SplitIndex, val: SplitIndex, names: tuple[str, str]) -> str:
    """'' when the two splits' labels agree as they are; what is mapped when val's classes are a named subset or
    another order of train's; a DataError in one line when they cannot be matched."""
    mapping = label_map(train, val, names)
    if mapping is None:
        return ""
    train_name, val_name = names
    kind = "the same classes in another order" if len(val.classes) == len(train.classes) else (
        f"{len(val.classes)} of {train_name}'s {len(train.classes)} classes")
    return f"{val_name}: its classes are {kind}; its labels are mapped to {train_name}'s by class name"


class Relabelled:
    """A loader whose batches' labels are mapped by `mapping` (val label -> train label)."""

    def __init__(self, loader: Any, mapping: tuple[int, ...], name: str) -> None:
        self.loader, self.mapping, self.name = loader, mapping, name

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch

        table = torch.tensor(self.mapping)
        for batch in self.loader:
            labels = batch["label"]
            if (labels >= len(table)).any():
                raise DataError(f"{self.name}: a sample's label {int(labels.max())} is beyond the {len(table)} "
                                "classes its dataset.json lists")
            yield {**batch, "label": torch.where(labels >= 0, table[labels.clamp(min=0)], labels)}


def relabelled(loader: Any, train: SplitIndex, val: SplitIndex, names: tuple[str, str]) -> Any:
    """`loader` over `val`, its labels made the train split's (`label_map`)."""
    mapping = label_map(train, val, names)
    return loader if mapping is None else Relabelled(loader, mapping, names[1])
