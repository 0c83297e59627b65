"""The W&B logger (``train.loggers: [jsonl, wandb]``), offline into a temporary run directory.

What W&B recorded is read back from its own transaction log (``run-*.wandb``:
the LevelDB log format under a 7-byte ``:W&B`` header, one protobuf
``Record`` each), not through wandb's API, and compared with metrics.jsonl.
"""
import glob
import json
import os
import struct
import time

import pytest
import yaml

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

from jaxent import cli  # noqa: E402
from jaxent import config as C  # noqa: E402
from jaxent.train import MetricsLogger  # noqa: E402
from tests._tiny import TWO_HEAD_ARCH  # noqa: E402

_BLOCK = 32768
_HEADER = 7  # ":W&B", magic (2 bytes), version (1 byte); also each record's header length


def _records(path):
  """The protobuf ``Record``s of a W&B transaction log."""
  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  pos, out, partial = _HEADER, [], b""
  while pos + _HEADER <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < _HEADER:  # a block's tail too short for a header is padding
      pos += left
      continue
    _crc, n, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
    if (kind == 0 and n == 0) or pos + _HEADER + n > len(data):  # the end, or a record being written
      break
    chunk = data[pos + _HEADER:pos + _HEADER + n]
    pos += _HEADER + n
    if kind == 1:      # full
      out.append(chunk)
    elif kind == 2:    # first
      partial = chunk
    elif kind == 3:    # middle
      partial += chunk
    elif kind == 4:    # last
      out.append(partial + chunk)
  recs = []
  for raw in out:
    r = pb.Record()
    r.ParseFromString(raw)
    recs.append(r)
  return recs


def _wandb_run(run_dir):
  logs = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
  assert len(logs) == 1, logs
  # wandb's service process may still be writing the log when finish()
  # returns: wait (bounded) for its closing "exit" record.
  deadline = time.monotonic() + 30.0
  while not any(r.WhichOneof("record_type") == "exit" for r in _records(logs[0])):
    assert time.monotonic() < deadline, f"{logs[0]} has no exit record after 30 s"
    time.sleep(0.1)
  run, history = None, {}
  for r in _records(logs[0]):
    kind = r.WhichOneof("record_type")
    if kind == "run":
      run = r.run
    elif kind == "history":
      row = {(".".join(i.nested_key) or i.key): json.loads(i.value_json) for i in r.history.item}
      history[r.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
  return run, history


@pytest.fixture
def offline(monkeypatch):
  for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("WANDB_SILENT", "true")


def test_train_logs_project_name_config_and_every_row_to_wandb_offline(tmp_path, offline):
  cfg = {"name": "wb-run",
         "model": {"arch": TWO_HEAD_ARCH},
         "data": {"task": "arithmetic", "num_operands": 2, "num_digits": 2, "num_eval": 16},
         "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 4,
                     "reward": "arithmetic_exact"},
         "train": {"steps": 3, "progress": False, "loggers": ["jsonl", "wandb"],
                   "wandb_project": "wb-test"}}
  path = tmp_path / "cfg.yaml"
  path.write_text(yaml.safe_dump(cfg))
  run_dir = tmp_path / "run"
  assert cli.main(["train", str(path), "--run-dir", str(run_dir)]) == 0
  assert not (run_dir / "tb").exists()  # tensorboard not asked for
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]
  run, history = _wandb_run(str(run_dir))
  assert run.project == "wb-test" and run.display_name == "wb-run"
  config = {i.key: json.loads(i.value_json) for i in run.config.update}
  want = C.from_dict(cfg).to_dict()
  for section in ("model", "data", "rollout", "loss", "optim", "train"):
    # W&B stores the config as JSON: the loggers tuple comes back a list
    assert config[section] == json.loads(json.dumps(want[section])), section
  assert config["name"] == "wb-run"
  assert sorted(history) == [1, 2, 3]
  for r in rows:
    # every finite scalar of the row, under the same key; nulls (NaN) are not sent
    assert history[r["step"]] == {k: v for k, v in r.items() if k != "step" and v is not None}


def test_wandb_failure_while_logging_warns_and_keeps_the_run(tmp_path, offline, capsys):
  logger = MetricsLogger(str(tmp_path), loggers=("jsonl", "wandb"), run_name="x",
                         config={"a": 1})

  real_log, steps = logger._wandb._run.log, []

  def flaky(data, step=None, **kwargs):
    steps.append(step)
    if len(steps) == 2:
      raise ConnectionError("network is gone")
    return real_log(data, step=step, **kwargs)

  logger._wandb._run.log = flaky
  logger.log(1, {"loss": 0.5})
  logger.log(2, {"loss": 0.25})  # W&B fails: one warning, the row still reaches metrics.jsonl
  logger.log(3, {"loss": 0.125})  # W&B is off: not sent
  logger.close()
  assert steps == [1, 2]
  err = capsys.readouterr().err
  assert err.count("wandb logging failed at step 2") == 1 and "ConnectionError" in err
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}, {"step": 3, "loss": 0.125}]
  _, history = _wandb_run(str(tmp_path))
  assert history == {1: {"loss": 0.5}}


def test_bad_loggers_are_config_errors():
  base = {"model": {"arch": TWO_HEAD_ARCH}, "data": {"task": "arithmetic"}}
  with pytest.raises(C.ConfigError, match=r"train.loggers: 'wb' is not a logger; choose from "
                                          r"\['jsonl', 'tensorboard', 'wandb'\]"):
    C.from_dict(base, ["train.loggers=[jsonl,wb]"])
  with pytest.raises(C.ConfigError, match="train.loggers: expected a list"):
    C.from_dict(base, ["train.loggers=wandb"])
  with pytest.raises(C.ConfigError, match="names a logger twice"):
    C.from_dict(base, ["train.loggers=[wandb,wandb]"])
  assert C.from_dict(base, ["train.loggers=[wandb]"]).train.loggers == ("wandb",)
