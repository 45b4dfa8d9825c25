"""The generated config reference covers every key, and the README embeds the current one."""

import dataclasses
from pathlib import Path

from decon_med.cli import main
from decon_med.config import FinetuneConfig, PretrainConfig, flatten, to_dict
from decon_med.config_reference import (
    BEGIN_MARKER,
    END_MARKER,
    attribute_docs,
    format_value,
    reference_markdown,
    reference_rows,
    replace_between_markers,
)
from decon_med.experiment import ExperimentConfig, InitSpec

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_key_has_a_meaning_and_its_default():
    for schema in (PretrainConfig, FinetuneConfig):
        rows = {row["key"]: row for row in reference_rows(schema)}
        flat = flatten(to_dict(schema()))
        if schema is PretrainConfig:  # every registered method's section, not only the default method's
            from decon_med.ssl import registry

            for name, spec in registry.methods().items():
                flat.update(flatten(to_dict(spec.settings()), f"ssl.{name}."))
            assert {"ssl.slotcon.teacher_temp", "ssl.densecl.queue_size", "ssl.mim.mask_ratio"} <= set(flat)
        assert set(rows) == set(flat)
        # keys resolved when a config is built show the value a user writes, not what it resolves to
        declared = {
            "transfer": "auto",
            "ssl.decoder.levels": "null",
            "ssl.decoder.alpha": "null",
            "ssl.decoder.skip_dropout": "null",
        }
        for key, value in flat.items():
            assert rows[key]["meaning"], f"{key} has no description in its dataclass docstring"
            assert rows[key]["default"] == declared.get(key, format_value(value)), key


def test_experiment_keys_are_documented():
    for cls in (ExperimentConfig, InitSpec):
        docs = attribute_docs(cls)
        assert {f.name for f in dataclasses.fields(cls)} <= set(docs)


def test_attribute_docs_joins_continuation_lines():
    @dataclasses.dataclass
    class Demo:
        """Demo.

        Attributes:
            a: first line
                and its continuation.
            b: second.

        Example:
            >>> Demo()
        """

        a: int = 1
        b: str = "x"

    assert attribute_docs(Demo) == {"a": "first line and its continuation.", "b": "second."}


def test_types_and_defaults_are_rendered_as_yaml():
    rows = {row["key"]: row for row in reference_rows(PretrainConfig)}
    assert rows["model.arch"]["type"] == "unet \\| fpn \\| fcn"
    assert rows["data.num_classes"]["type"] == "int \\| null"
    assert rows["data.num_classes"]["default"] == "null"
    assert rows["augment.crop_scale"]["default"] == "[0.08, 1.0]"
    assert rows["train.channels_last"]["default"] == "false"


def test_readme_embeds_the_current_reference():
    text = README.read_text()
    assert BEGIN_MARKER in text and END_MARKER in text
    assert replace_between_markers(text, reference_markdown()) == text, (
        "README config reference is stale: run `decon-med config-reference --update README.md`"
    )


def test_cli_prints_and_updates(tmp_path, capsys):
    assert main(["config-reference"]) == 0
    assert "| `ssl.decoder.alpha` |" in capsys.readouterr().out
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{BEGIN_MARKER}\nOLD REFERENCE\n{END_MARKER}\noutro\n")
    assert main(["config-reference", "--update", str(doc)]) == 0
    text = doc.read_text()
    assert (
        "OLD REFERENCE" not in text and "| `train.lr` |" in text and text.endswith(f"{END_MARKER}\noutro\n")
    )
    assert main(["config-reference", "--update", str(tmp_path / "missing.md")]) == 2
