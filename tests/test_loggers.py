"""train.loggers: metrics.jsonl always, TensorBoard and W&B (offline) with the same names and values."""

from __future__ import annotations

import builtins
import json

import pytest

from lostlm.configs import load_config
from lostlm.errors import LostLMError
from lostlm.loggers import Loggers, flat_numbers
from lostlm.train import Trainer


def jsonl_scalars(run_dir) -> dict[str, dict[int, float]]:
    """{name: {step: value}} of metrics.jsonl: the reference the trackers must reproduce."""
    out: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name, value in flat_numbers(record).items():
            if name != "step":
                out.setdefault(name, {})[record["step"]] = value
    return out


def wandb_records(path):
    """The protobuf records of an offline ``.wandb`` file (a LevelDB-style log: a 7-byte header,
    then 32 KiB blocks of chunks: crc32 (4), length (2, little-endian), type (1: full, 2: first,
    3: middle, 4: last), data). Read here without wandb's own reader, which is not public."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_tensorboard_and_wandb_get_the_jsonl_metrics_config_and_summary(tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "tracked"
    cfg = load_config(None, tiny_run("tracked", train__loggers="[jsonl,tensorboard,wandb]"))
    summary = Trainer(cfg).train()

    reference = jsonl_scalars(run_dir)
    assert {"loss", "lr", "grad_norm", "tok_per_s", "val_loss"} <= set(reference)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for name, by_step in reference.items():
        logged = {e.step: e.value for e in events.Scalars(name)}
        assert logged.keys() == by_step.keys()
        assert all(abs(logged[s] - v) <= 1e-6 * max(1.0, abs(v)) for s, v in by_step.items())  # float32 in the event file
    assert abs(events.Scalars("summary/val_loss")[0].value - summary["val_loss"]) <= 1e-6 * summary["val_loss"]
    texts = events.Tensors("config/text_summary")
    assert texts and "tracked" in texts[0].tensor_proto.string_val[0].decode()

    offline = list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    assert len(offline) == 1
    records = wandb_records(offline[0])
    history: dict[str, dict[int, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for name, value in items.items():
                if not name.startswith("_"):
                    history.setdefault(name, {})[record.history.step.num] = value
    assert history == reference  # same names, steps and values (JSON doubles: exact)
    summaries = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.summary.update}
                 for r in records if r.WhichOneof("record_type") == "summary"]
    final = next(s for s in reversed(summaries) if "val_loss" in s)
    assert final["val_loss"] == summary["val_loss"] and final["tokens"] == summary["tokens"]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in run.config.update}
    layer, train = (config[k].get("value", config[k]) for k in ("layer", "train"))  # {"value": ...} in some versions
    assert layer["method"] == "lost" and train["out_dir"] == str(run_dir)


def test_missing_tracker_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_trackers(name, *args, **kwargs):
        if name.split(".")[0] in ("wandb", "tensorboard") or name == "torch.utils.tensorboard":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_trackers)
    for name in ("tensorboard", "wandb"):
        with pytest.raises(LostLMError) as info:
            Loggers(tmp_path, ["jsonl", name], {})
        message = str(info.value)
        assert f"lostlm[{name}]" in message and "\n" not in message


def test_only_rank_zero_writes(tmp_path):
    quiet = Loggers(tmp_path / "other-rank", ["jsonl", "tensorboard", "wandb"], {}, enabled=False)
    quiet.log({"step": 1, "loss": 2.0})
    quiet.summary({"val_loss": 1.0})
    quiet.close()
    assert not (tmp_path / "other-rank").exists()


def test_unknown_logger_is_refused():
    with pytest.raises(LostLMError, match="train.loggers"):
        load_config(None, ["train.loggers=[jsonl,mlflow]"])
