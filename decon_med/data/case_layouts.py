"""Case-list layouts of volumes: nnU-Net raw folders and MSD / MONAI datalist JSON files.

Both list cases (one image, possibly one file per channel, and an optional label), for pre-training (images only)
and fine-tuning. Labelled train / val / test splits follow :func:`~decon_med.data.layout_base.assign_splits`:
a labelled test set shipped with the data is the test split, otherwise ``data.test_fraction`` of the labelled
cases is held out; val is ``data.fold`` of ``data.num_folds`` (seeded k-fold) or ``data.val_fraction``.

nnU-Net raw (``data.name: nnunet``, ``data.root`` = the ``DatasetXXX_Name`` folder)::

    dataset.json                   {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                    "numTraining": N, "file_ending": ".nii.gz"}
    imagesTr/<case>_0000.nii.gz    one file per channel, suffix _XXXX = channel index
    labelsTr/<case>.nii.gz
    imagesTs/<case>_0000.nii.gz    optional; the test split when labelsTs/ holds its labels
    splits_final.json              optional (or data.splits_file): nnU-Net's folds; data.fold picks one

The ``_XXXX`` files of a case are stacked as channels in index order; ``channel_names`` decides each channel's
intensity handling (:func:`~decon_med.data.intensity.channel_handling`: ``CT`` = CT windows, other names MR).
Pre-training (listed without labels) reads every case of ``imagesTr`` and ``imagesTs``.

MSD / MONAI datalist (``data.name: datalist``, ``data.root`` = the JSON file or a folder holding
``dataset.json``), read with ``monai.data.load_decathlon_datalist``; paths are relative to the JSON's folder::

    {"labels": {"0": "background", "1": "tumour"},
     "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
     "validation": [...],                  optional: the val split (then data.fold is not used)
     "test": ["imagesTs/c.nii.gz", ...]}   optional; the test split when its entries have labels

An image may be a list of files (one per channel; ``data.channels`` selects some). Multi-contrast 4D images need
``data.channels``.

Example:
    >>> layout = get_layout(DataConfig(name="nnunet", root="nnUNet_raw/Dataset001_Liver", fold=0))
    >>> layout.class_names, len(layout.items("val"))
    (('background', 'liver'), 96)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from decon_med.config import DataConfig
from decon_med.data.io import file_stem
from decon_med.data.layout_base import Layout, _holdout, assign_splits, check_in_channels
from decon_med.errors import DataError

__all__ = ["Datalist", "NnUNetRaw"]

Case = tuple[list[Path], Path | None]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(path, "expected a JSON object")
    return data


def _class_names(labels: dict[str, int], path: Path) -> tuple[str, ...]:
    """Class names in index order from ``{name: index}``; indices must be exactly 0..K-1."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(path, "'labels' must be a non-empty mapping")
    for name, value in labels.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(path, f"label '{name}' has value {value!r}; only integer labels are supported")
    by_index = sorted((value, name) for name, value in labels.items())
    if [v for v, _ in by_index] != list(range(len(by_index))):
        raise DataError(path, f"label values {[v for v, _ in by_index]} must be exactly 0..K-1")
    return tuple(name for _, name in by_index)


def _read_splits_final(path: Path) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json``: a list with one ``{"train": [ids], "val": [ids]}`` per fold."""
    if not path.is_file():
        raise DataError(path, "splits file not found (data.splits_file)")
    try:
        folds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not valid JSON ({exc})") from exc

    def is_fold(fold: object) -> bool:
        return isinstance(fold, dict) and all(
            isinstance(fold.get(k), list) and all(isinstance(i, str) for i in fold[k])
            for k in ("train", "val")
        )

    if not isinstance(folds, list) or not folds or not all(is_fold(f) for f in folds):
        raise DataError(
            path, 'expected nnU-Net splits: a list of {"train": [case ids], "val": [case ids]} per fold'
        )
    return folds


class _CaseLayout(Layout):
    """A layout listing whole cases: labelled cases, an optional val list and an optional shipped test set.

    Listed without labels (pre-training), the train split is every case of the dataset: the training, validation
    and test cases, labelled or not (nnU-Net: ``imagesTr`` and ``imagesTs``).
    """

    #: The JSON file the channel names come from (named in errors).
    channel_source: Path

    def _cases(self, labeled: bool) -> dict[str, Case]:
        raise NotImplementedError

    def _test_cases(self) -> dict[str, Case]:
        return {}

    def _val_cases(self) -> dict[str, Case] | None:
        return None

    def _split_ids(self, cases: dict, val: dict | None, test: dict) -> dict[str, list[str]]:
        labelled_test = bool(test) and all(label is not None for _, label in test.values())
        if val is not None and self.cfg.fold is None:
            if labelled_test:
                return {"train": sorted(cases), "val": sorted(val), "test": sorted(test)}
            held = _holdout(sorted(cases), 0.0, self.cfg.test_fraction, seed=0)
            return {"train": held["train"], "val": sorted(val), "test": held["test"]}
        pool = sorted({**cases, **(val or {})})
        return assign_splits(pool, self.cfg, test_ids=sorted(test) if labelled_test else None)

    def _pairs(self, split, labeled):
        check_in_channels(self.cfg, self.channel_source)
        cases = self._cases(labeled)
        if not cases:
            raise DataError(self.root, "no training cases listed")
        val, test = self._val_cases(), self._test_cases()
        overlap = sorted((cases.keys() | (val or {}).keys()) & test.keys())
        if overlap:
            raise DataError(self.root, f"case ids in both training and test: {overlap[:5]}")
        everything = {**cases, **(val or {}), **test}
        self._ids = {str(images[0]): case_id for case_id, (images, _) in everything.items()}
        if not labeled and split == "train":  # pre-training: every scan, whatever its split or label
            ids = {"train": sorted(everything)}
        else:
            ids = self._split_ids(cases, val, test)
        pairs = []
        for case_id in ids[split]:
            images, label = everything[case_id]
            if labeled and label is None:
                raise DataError(images[0], "case has no label")
            pairs.append((images if len(images) > 1 else images[0], label if labeled else None))
        return pairs

    def _item_id(self, image: Path) -> str:
        return getattr(self, "_ids", {}).get(str(image), file_stem(image))


class NnUNetRaw(_CaseLayout):
    """An nnU-Net raw dataset folder (``imagesTr``, ``labelsTr``, optional ``imagesTs`` / ``labelsTs``).

    ``dataset.json`` gives the class names and number of classes (``labels``), the channels (``channel_names``;
    ``data.channels`` selects some) and the file ending. Region-based labels (lists of values) are not supported.

    Example:
        >>> NnUNetRaw(DataConfig(name="nnunet", root="Dataset004_Hippocampus")).class_names
        ('background', 'Anterior', 'Posterior')
    """

    name = "nnunet"
    expected_tree = (
        "  ROOT/dataset.json             (channel_names, labels, file_ending)\n"
        "  ROOT/imagesTr/<case>_0000.nii.gz\n"
        "  ROOT/labelsTr/<case>.nii.gz\n"
        "  ROOT/imagesTs/<case>_0000.nii.gz   (optional)"
    )

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.meta_path = self.channel_source = self.root / "dataset.json"
        self.meta = _read_json(self.meta_path) if self.root.is_dir() else {}
        self.class_names = _class_names(self.meta.get("labels"), self.meta_path) if self.meta else ()
        self.file_ending = str(self.meta.get("file_ending", ".nii.gz"))
        names = self.meta.get("channel_names") or self.meta.get("modality") or {"0": "image"}
        self.channel_names = {int(k): str(v) for k, v in names.items()}

    def check_root(self) -> None:
        super().check_root()
        if not self.meta_path.is_file():
            raise DataError(self.meta_path, f"file not found; expected layout:\n{self.expected_tree}")

    def _channels(self) -> list[int]:
        wanted = sorted(self.channel_names) if self.cfg.channels is None else list(self.cfg.channels)
        unknown = [c for c in wanted if c not in self.channel_names]
        if unknown:
            raise DataError(
                self.meta_path, f"data.channels {unknown} not in channel_names {self.channel_names}"
            )
        return wanted

    def _folder_cases(self, images: str, labels: str | None) -> dict[str, Case]:
        folder = self.root / images
        if not folder.is_dir():
            return {}
        ending = re.escape(self.file_ending)
        pattern = re.compile(rf"(.+)_(\d{{4}}){ending}")
        by_case: dict[str, dict[int, Path]] = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            match = pattern.fullmatch(path.name)
            if match is None:
                raise DataError(path, f"expected <case>_XXXX{self.file_ending} (channel suffix) in {images}/")
            by_case.setdefault(match.group(1), {})[int(match.group(2))] = path
        channels = self._channels()
        label_dir = self.root / labels if labels else None
        cases: dict[str, Case] = {}
        for case_id, files in sorted(by_case.items()):
            missing = [c for c in channels if c not in files]
            if missing:
                raise DataError(
                    folder / f"{case_id}_{missing[0]:04d}{self.file_ending}",
                    "channel file missing for this case",
                )
            label = None
            if label_dir is not None and label_dir.is_dir():
                candidate = label_dir / f"{case_id}{self.file_ending}"
                if not candidate.is_file():
                    raise DataError(files[channels[0]], f"case has no label {candidate.name} in {labels}/")
                label = candidate
            cases[case_id] = ([files[c] for c in channels], label)
        if label_dir is not None and label_dir.is_dir():
            for path in sorted(label_dir.iterdir()):
                stem = path.name[: -len(self.file_ending)] if path.name.endswith(self.file_ending) else None
                if stem is not None and stem not in cases:
                    raise DataError(path, f"label has no matching image in {images}/")
        return cases

    def _cases(self, labeled):
        if not (self.root / "imagesTr").is_dir():
            raise DataError(self.root, f"imagesTr/ folder not found; expected layout:\n{self.expected_tree}")
        if labeled and not (self.root / "labelsTr").is_dir():
            raise DataError(self.root / "labelsTr", "folder not found")
        return self._folder_cases("imagesTr", "labelsTr" if labeled else None)

    def _test_cases(self):
        return self._folder_cases("imagesTs", "labelsTs")

    def splits_path(self) -> Path | None:
        """The nnU-Net ``splits_final.json`` read: ``data.splits_file``, else ``ROOT/splits_final.json`` if any.

        Example:
            >>> NnUNetRaw(DataConfig(name="nnunet", root="Dataset001_Liver")).splits_path()
            PosixPath('Dataset001_Liver/splits_final.json')
        """
        if self.cfg.splits_file is not None:
            return Path(self.cfg.splits_file).expanduser()
        found = self.root / "splits_final.json"
        return found if found.is_file() else None

    def _split_ids(self, cases, val, test):
        path = self.splits_path()
        if path is None:
            return super()._split_ids(cases, val, test)
        folds = _read_splits_final(path)
        fold = 0 if self.cfg.fold is None else self.cfg.fold
        if fold >= len(folds):
            raise DataError(path, f"has {len(folds)} fold(s); data.fold={fold} is not one of them")
        train, held = sorted(folds[fold]["train"]), sorted(folds[fold]["val"])
        both = sorted(set(train) & set(held))
        if both:
            raise DataError(path, f"fold {fold} lists cases in both train and val: {both[:5]}")
        unknown = sorted(set(train + held) - set(cases))
        if unknown:
            raise DataError(path, f"fold {fold} lists cases with no image in imagesTr/: {unknown[:5]}")
        if test and all(label is not None for _, label in test.values()):
            rest = sorted(test)
        else:
            rest = sorted(set(cases) - set(train) - set(held)) or held
        return {"train": train, "val": held, "test": rest}


class Datalist(_CaseLayout):
    """An MSD ``dataset.json`` or any MONAI datalist JSON (``training`` / ``validation`` / ``test`` lists).

    Class names come from ``labels`` (``{"0": "background", ...}``) when present, else ``data.class_names`` /
    ``data.num_classes``. Case ids are the image file stems (the first file of a multi-file image).

    Example:
        >>> Datalist(DataConfig(name="datalist", root="Task09_Spleen/dataset.json")).class_names
        ('background', 'spleen')
    """

    name = "datalist"
    expected_tree = (
        '  ROOT (JSON file, or a folder with dataset.json): {"training": [{"image": ..., "label": ...}], '
        '"validation": [...], "test": [...]}'
    )

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.json_path = self.channel_source = self.root / "dataset.json" if self.root.is_dir() else self.root
        self.meta = _read_json(self.json_path) if self.json_path.is_file() else {}
        labels = self.meta.get("labels")
        if isinstance(labels, dict) and labels:
            try:
                as_index = {str(name): int(key) for key, name in labels.items()}
            except ValueError as exc:
                raise DataError(self.json_path, f"'labels' keys must be class indices ({exc})") from exc
            self.class_names = _class_names(as_index, self.json_path)
        else:
            n = cfg.num_classes or 2
            self.class_names = (
                tuple(cfg.class_names) if cfg.class_names else tuple(f"class{i}" for i in range(n))
            )

    def check_root(self) -> None:
        if not self.json_path.is_file():
            raise DataError(self.json_path, f"datalist not found; expected:\n{self.expected_tree}")

    def _entries(self, key: str) -> list[dict] | None:
        if key not in self.meta:
            return None
        from monai.data import load_decathlon_datalist  # imported here: MONAI is slow to import

        raw = self.meta[key]
        if not isinstance(raw, list):
            raise DataError(self.json_path, f"'{key}' must be a list")
        try:
            return load_decathlon_datalist(self.json_path, True, key, self.json_path.parent)
        except (TypeError, ValueError, KeyError) as exc:
            raise DataError(self.json_path, f"'{key}': {exc}") from exc

    def _as_cases(self, key: str) -> dict[str, Case] | None:
        entries = self._entries(key)
        if entries is None:
            return None
        cases: dict[str, Case] = {}
        for entry in entries:
            if "image" not in entry:
                raise DataError(self.json_path, f"an entry of '{key}' has no 'image'")
            image = entry["image"]
            files = [Path(p) for p in (image if isinstance(image, list) else [image])]
            if len(files) > 1 and self.cfg.channels is not None:
                if max(self.cfg.channels) >= len(files):
                    raise DataError(
                        files[0], f"data.channels {self.cfg.channels} but the entry lists {len(files)} files"
                    )
                files = [files[c] for c in self.cfg.channels]
            for path in files:
                if not path.is_file():
                    raise DataError(path, f"file not found (listed in '{key}' of {self.json_path.name})")
            label = Path(entry["label"]) if entry.get("label") else None
            if label is not None and not label.is_file():
                raise DataError(label, f"file not found (listed in '{key}' of {self.json_path.name})")
            case_id = file_stem(files[0])
            if case_id in cases:
                raise DataError(files[0], f"duplicate case id '{case_id}' in '{key}'")
            cases[case_id] = (files, label)
        return cases

    def _cases(self, labeled):
        cases = self._as_cases("training")
        if cases is None:
            raise DataError(self.json_path, "has no 'training' list")
        return cases

    def _test_cases(self):
        return self._as_cases("test") or {}

    def _val_cases(self):
        return self._as_cases("validation")
