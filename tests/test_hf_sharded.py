"""Sharded checkpoint loading: ``models.from_pretrained(..., shardings= | mesh=)``.

Every parameter must come out with exactly the requested sharding and the
bits of the unsharded load, and must be read as slices: the safetensors
handles are wrapped so that every read is recorded (and a whole-tensor
``get_tensor`` fails), and the elements read per parameter must equal the
elements of its distinct addressable shards. The trainer's ``build_components``
must load onto the mesh ``train`` plans, and each of two CPU processes must
read only its own devices' slices.
"""
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import torch
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

from jaxent import config as C
from jaxent import models, sharding
from jaxent.train import _build, _shard
from jaxent.train._step import make_optimizer
from tests._hf_tiny import FAMILIES, make_torch_model, torch_logits
from tests._tiny import loop_config

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]

# HF tensor name (layer index dropped) -> our parameter: the test's own map.
_OURS = {
    "model.embed_tokens.weight": "embed/embedding", "model.norm.weight": "final_norm/scale",
    "lm_head.weight": "lm_head/kernel",
    "input_layernorm.weight": "layers/attn_norm/scale",
    "post_attention_layernorm.weight": "layers/mlp_norm/scale",
    **{f"self_attn.{p}_proj.{w}": f"layers/{p}_{'kernel' if w == 'weight' else 'bias'}"
       for p in "qkvo" for w in ("weight", "bias")},
    **{f"mlp.{p}_proj.weight": f"layers/{p}_kernel" for p in ("gate", "up", "down")},
}


def _ours(hf_name: str) -> str:
  parts = hf_name.split(".")
  return _OURS[hf_name] if parts[1] != "layers" else _OURS[".".join(parts[3:])]


class Reads:
  """Wraps ``safetensors.safe_open``: records ``(name, elements)`` of every slice read."""

  def __init__(self, monkeypatch):
    self.reads: list[tuple[str, int]] = []
    self.sizes: dict[str, int] = {}
    real, rec = safetensors.safe_open, self

    class Slice:
      def __init__(self, s, name):
        self._s, self._name = s, name

      def get_shape(self):
        return self._s.get_shape()

      def get_dtype(self):
        return self._s.get_dtype()

      def __getitem__(self, idx):
        out = self._s[idx]
        rec.reads.append((self._name, out.size))
        return out

    class Handle:
      def __init__(self, filename, framework, **kw):
        self._f = real(filename, framework=framework, **kw)

      def __enter__(self):
        self._f.__enter__()
        return self

      def __exit__(self, *a):
        return self._f.__exit__(*a)

      def keys(self):
        return self._f.keys()

      def get_tensor(self, name):
        raise AssertionError(f"whole-tensor read of {name}")

      def get_slice(self, name):
        s = self._f.get_slice(name)
        rec.sizes[name] = int(np.prod(s.get_shape()))
        return Slice(s, name)

    monkeypatch.setattr(safetensors, "safe_open", Handle)

  def per_param(self) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, n in self.reads:
      out[_ours(name)] = out.get(_ours(name), 0) + n
    return out


def _flat(tree) -> dict:
  is_sh = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
  return {"/".join(str(k.key) for k in kp): v
          for kp, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_sh)[0]}


def _check_slices_only(reads: Reads, params, shardings):
  """Elements read per parameter == elements of its distinct addressable shards;
  a sharded parameter never reads a whole HF tensor."""
  want = {}
  for name, x in _flat(params).items():
    boxes = {tuple((s.start, s.stop) for s in idx) for idx in
             shardings[name].addressable_devices_indices_map(x.shape).values()}
    want[name] = sum(int(np.prod([(b or n) - (a or 0) for (a, b), n in zip(box, x.shape)]))
                     for box in boxes)
  assert reads.per_param() == want
  for hf_name, n in reads.reads:
    if not shardings[_ours(hf_name)].is_fully_replicated:
      assert n < reads.sizes[hf_name], hf_name


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """``(torch model, checkpoint dir, unsharded jaxent load)`` of a tiny untied Qwen2."""
  tm = make_torch_model(FAMILIES["qwen2"](), seed=3)
  path = str(tmp_path_factory.mktemp("qwen2"))
  tm.save_pretrained(path)
  return tm, path, models.from_pretrained(path)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_load_equals_unsharded_and_reads_only_shards(ckpt, shape, monkeypatch):
  _, path, ref = ckpt
  mesh = sharding.make_mesh(*shape)
  want = models.param_shardings(ref.config, mesh)
  reads = Reads(monkeypatch)
  m = models.from_pretrained(path, mesh=mesh)
  flat, sh = _flat(m.params), _flat(want)
  assert flat.keys() == _flat(ref.params).keys()
  for name, x in flat.items():
    assert x.sharding == sh[name], name
    assert x.sharding == _flat(models.param_shardings(ref.config, mesh))[name]  # the trainer's
  jax.tree.map(np.testing.assert_array_equal, m.params, ref.params)
  _check_slices_only(reads, m.params, sh)
  if shape == (2, 2, 2):  # this mesh really splits the heads and the embed dimension
    assert m.params["layers"]["q_kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert not m.params["embed"]["embedding"].sharding.is_fully_replicated


def test_sharded_model_logits_match_transformers(ckpt):
  tm, path, _ = ckpt
  mesh = sharding.make_mesh(2, 2, 2)
  m = models.from_pretrained(path, shardings=models.param_shardings(
      models.load_config(path), mesh))
  tokens = np.random.RandomState(0).randint(0, 160, (4, 10)).astype(np.int32)
  with jax.set_mesh(mesh):
    tok = jax.device_put(tokens, sharding.named_sharding(mesh, ("batch", "seq")))
    logits, _ = jax.jit(models.apply, static_argnums=0)(m.config, m.params, tok)
  np.testing.assert_allclose(np.asarray(logits), torch_logits(tm, tokens), rtol=1e-4, atol=2e-5)


def test_any_sharding_incl_head_dim_and_layer_axes(ckpt, monkeypatch):
  # Layouts the logical table never produces: the head_dim split makes each
  # head's rows a separate read; the layer split reads only those layers.
  _, path, ref = ckpt
  mesh = sharding.make_mesh(2, 2, 2)
  sh = jax.tree.map(lambda x: NamedSharding(mesh, P()), ref.params)
  sh["layers"]["q_kernel"] = NamedSharding(mesh, P("data", None, "fsdp", "tensor"))
  sh["layers"]["o_kernel"] = NamedSharding(mesh, P("tensor", ("data", "fsdp"), None))
  sh["layers"]["q_bias"] = NamedSharding(mesh, P(None, None, ("data", "fsdp", "tensor")))
  sh["layers"]["down_kernel"] = NamedSharding(mesh, P("data", "tensor", "fsdp"))
  sh["lm_head"]["kernel"] = jax.sharding.SingleDeviceSharding(jax.devices()[5])
  reads = Reads(monkeypatch)
  m = models.from_pretrained(path, shardings=sh)
  for name, s in _flat(sh).items():
    assert _flat(m.params)[name].sharding == s
  jax.tree.map(np.testing.assert_array_equal, m.params, ref.params)
  _check_slices_only(reads, m.params, _flat(sh))
  # q_kernel [L=2, D, H=4, N=16] over data x fsdp x tensor: a device holds one
  # layer, 2 heads x 8 of N, so it reads 2 rows runs of 8 from that layer's q_proj.
  q_reads = [n for name, n in reads.reads if name.endswith("q_proj.weight")]
  assert q_reads == [8 * 64] * (8 * 2)


def test_safetensors_index_checkpoint_loads_sharded(ckpt, tmp_path, monkeypatch):
  tm, _, ref = ckpt
  tm.save_pretrained(tmp_path, max_shard_size="40KB")
  files = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
  assert os.path.exists(tmp_path / "model.safetensors.index.json") and len(files) > 1
  mesh = sharding.make_mesh(2, 2, 2)
  reads = Reads(monkeypatch)
  m = models.from_pretrained(tmp_path, mesh=mesh)
  jax.tree.map(np.testing.assert_array_equal, m.params, ref.params)
  _check_slices_only(reads, m.params, _flat(models.param_shardings(m.config, mesh)))


def test_bfloat16_checkpoint_loads_sharded(ckpt, tmp_path, monkeypatch):
  tm, _, _ = ckpt
  tm16 = make_torch_model(FAMILIES["qwen2"](), seed=3).to(torch.bfloat16)
  tm16.save_pretrained(tmp_path)
  with safetensors.safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
    assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
  mesh = sharding.make_mesh(2, 2, 2)
  ref16 = models.from_pretrained(tmp_path, dtype="bfloat16")
  reads = Reads(monkeypatch)
  m16 = models.from_pretrained(tmp_path, dtype="bfloat16", mesh=mesh)
  _check_slices_only(reads, m16.params, _flat(models.param_shardings(m16.config, mesh)))
  m32 = models.from_pretrained(tmp_path, dtype="float32", mesh=mesh)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(m16.params))
  jax.tree.map(np.testing.assert_array_equal, m16.params, ref16.params)
  # against torch's own bfloat16 tensors (bit patterns), and their exact float32 upcast
  sd = {k: v.float().numpy() for k, v in tm16.state_dict().items()}
  q1 = sd["model.layers.1.self_attn.q_proj.weight"].reshape(4, 16, 64).transpose(2, 0, 1)
  np.testing.assert_array_equal(np.asarray(m16.params["layers"]["q_kernel"][1], np.float32), q1)
  np.testing.assert_array_equal(np.asarray(m32.params["layers"]["q_kernel"][1]), q1)
  np.testing.assert_array_equal(np.asarray(m32.params["lm_head"]["kernel"]), sd["lm_head.weight"].T)
  # a float32 checkpoint loaded as bfloat16 rounds like torch (to nearest even)
  m = models.from_pretrained(ckpt[1], dtype="bfloat16", mesh=mesh)
  want = tm.model.embed_tokens.weight.detach().to(torch.bfloat16).view(torch.int16).numpy()
  assert np.array_equal(np.asarray(m.params["embed"]["embedding"]).view(np.int16), want)


def test_bad_input_raises_before_any_read(ckpt, tmp_path, monkeypatch):
  _, path, ref = ckpt
  mesh = sharding.make_mesh(2, 2, 2)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json")) as f:
    config = f.read()

  def write(name, ts):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(config)
    save_file(ts, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d

  bad_shape = write("shape", {**tensors, "model.layers.1.mlp.up_proj.weight":
                              np.zeros((95, 64), np.float32)})
  # k_proj transposed: the right size (a reshape would take it), the wrong shape
  k0 = "model.layers.0.self_attn.k_proj.weight"
  bad_k = write("k", {**tensors, k0: tensors[k0].T.copy()})
  extra = dict(tensors, **{"model.extra.weight": np.zeros((2,), np.float32)})
  del extra["model.layers.0.self_attn.k_proj.bias"]
  bad_names = write("names", extra)
  sh = models.param_shardings(ref.config, mesh)
  sh["layers"]["k_bias"] = NamedSharding(mesh, P(None, ("data", "fsdp", "tensor")))  # 8 !| 2 heads
  reads = Reads(monkeypatch)
  with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(95, 64\)"):
    models.from_pretrained(bad_shape, mesh=mesh)
  with pytest.raises(ValueError, match=r"k_proj.weight' has shape \(64, 32\), which does not match "
                                       r"the config \(expected k_kernel of shape \(64, 2, 16\)\)"):
    models.from_pretrained(bad_k, mesh=mesh)
  with pytest.raises(ValueError, match="missing tensors.*layers.0.self_attn.k_proj.bias"
                                       ".*unexpected tensors.*model.extra.weight"):
    models.from_pretrained(bad_names, mesh=mesh)
  with pytest.raises(ValueError, match="shardings: expected a pytree"):
    models.from_pretrained(path, shardings={"embed": {"embedding": NamedSharding(mesh, P())}})
  with pytest.raises(ValueError, match=r"shardings: layers/k_bias of shape \(2, 2, 16\)"):
    models.from_pretrained(path, shardings=sh)
  with pytest.raises(ValueError, match="shardings or mesh, not both"):
    models.from_pretrained(path, shardings=sh, mesh=mesh)
  assert reads.reads == []


# ----------------------------------------------------------------------------- trainer
def _with_tokenizer(tm, path):
  """A checkpoint directory with a character-level WordLevel tokenizer (ids < 160)."""
  import tokenizers
  import transformers
  chars = ["<unk>", "<eos>"] + list("0123456789+-=$ ")
  vocab = {c: i for i, c in enumerate(chars)}
  t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "<unk>"))
  t.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>",
                                             eos_token="<eos>", pad_token="<eos>")
  tm.save_pretrained(path)
  tok.save_pretrained(path)
  return str(path)


def test_build_components_loads_onto_the_train_mesh(ckpt, tmp_path, monkeypatch):
  tm, _, ref = ckpt
  raw = loop_config(mesh={"data": 2, "fsdp": 2, "tensor": 2})
  raw["model"] = {"path": _with_tokenizer(tm, tmp_path / "hf")}
  cfg = C.from_dict(raw)
  reads = Reads(monkeypatch)
  comps = _build.build_components(cfg, str(tmp_path / "run"))
  # the mesh train() plans (jaxent/train/_loop.py), and the train state's layout
  plan = sharding.plan_mesh(cfg, jax.device_count(), process_count=jax.process_count(),
                          model_config=comps.model_config)
  mesh = plan.make_mesh()
  tx = make_optimizer(cfg.optim, 4)
  state_sh = _shard.state_shardings(comps.model_config, tx, mesh)
  psh = _flat(state_sh.params)
  for name, x in _flat(comps.params).items():
    assert x.sharding == psh[name], name
  _check_slices_only(reads, comps.params, psh)
  jax.tree.map(np.testing.assert_array_equal, comps.params, ref.params)
  # The loop's copy into the train state stays on the devices: no host round trip.
  key = jax.random.PRNGKey(0)
  with jax.transfer_guard_host_to_device("disallow"), jax.transfer_guard_device_to_host("disallow"):
    state = _shard.init_train_state(comps.params, tx, key, state_sh)
  for name, x in _flat(state.params).items():
    assert x.sharding == psh[name], name
  jax.tree.map(np.testing.assert_array_equal, state.params, ref.params)


def test_load_run_restores_a_model_path_run_without_reading_model_path(ckpt, tmp_path, monkeypatch):
  from jaxent import train as T
  from jaxent.train._checkpoint import Checkpointer
  from jaxent.train._step import init_state
  tm, _, ref = ckpt
  raw = loop_config()
  raw["model"] = {"path": _with_tokenizer(tm, tmp_path / "hf")}
  cfg = C.from_dict(raw)
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.yaml").write_text(cfg.to_yaml())
  trained = jax.tree.map(lambda x: x + 0.5, ref.params)   # not what model.path holds
  tr = cfg.train
  tx = make_optimizer(cfg.optim, tr.steps * tr.ppo_epochs * tr.mini_batches)
  ck = Checkpointer(str(run / "checkpoints"))
  ck.save(3, init_state(trained, tx, jax.random.PRNGKey(0)), {"rl_step": 3, "data": {}})
  ck.close()
  reads = Reads(monkeypatch)
  got_cfg, model, tok, step = T.load_run(str(run))
  assert reads.reads == []                    # the weights come from the checkpoint alone
  assert step == 3 and got_cfg.model.path == cfg.model.path and tok is not None
  jax.tree.map(np.testing.assert_array_equal, model.params, trained)


# ----------------------------------------------------------------------------- processes
_PROC = """
import sys
import jax
import numpy as np
from jaxent import models, sharding
from jaxent.models import _hf

jax.distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]), initialization_timeout=60)
read = []
real = _hf._read_slice
def rec(handle, name, box):
  read.append(int(np.prod([b - a for a, b in box])))
  return real(handle, name, box)
_hf._read_slice = rec
mesh = sharding.make_mesh(1, 4, 2)  # fsdp spans the processes: each holds half
m = models.from_pretrained("{path}", mesh=mesh)
n_read = sum(read)
ref = models.from_pretrained("{path}")  # whole, on this process's first device
local = total = 0
want = jax.tree.leaves(models.param_shardings(m.config, mesh),
                       is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
for x, r, sh in zip(jax.tree.leaves(m.params), jax.tree.leaves(ref.params), want):
  assert x.sharding == sh and not x.is_fully_addressable
  r = np.asarray(r)
  boxes = set()
  for s in x.addressable_shards:
    np.testing.assert_array_equal(np.asarray(s.data), r[s.index])
    boxes.add(tuple((i.start, i.stop) for i in s.index))
  local += sum(int(np.prod([(b or n) - (a or 0) for (a, b), n in zip(bx, x.shape)])) for bx in boxes)
  total += x.size
print("OK", jax.process_index(), n_read, local, total, flush=True)
"""


def test_each_process_reads_only_its_own_shards(ckpt, tmp_path):
  _, path, _ = ckpt
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "load.py"
  script.write_text(_PROC.format(port=port, path=path))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXENT_", "SLURM_"))}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.getcwd())
  procs = [subprocess.Popen([sys.executable, str(script), str(i)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  rows = [line.split() for out, _ in outs for line in out.splitlines() if line.startswith("OK")]
  assert sorted(int(r[1]) for r in rows) == [0, 1]
  for _, _, n_read, local, total in rows:
    # each process read exactly its devices' distinct shards: less than the model
    assert int(n_read) == int(local) < int(total)
