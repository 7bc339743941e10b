"""A catalog of bad inputs (issue 9): plans, model configs, training configs, CLI flags, checkpoints and the
launcher environment. Each case runs the command with each rank's environment (on two ranks where a job would
run on several) and asserts the error each rank prints (the field and the rule), its exit code, and that nothing
on disk changed. The README's "When things go wrong" table is this catalog.

Every case but one is refused before torch is imported, so it runs in this process, once per rank's
environment; one test runs all of them in a fresh process that cannot import torch, which proves it. The
rendezvous case and a sample of the others run as real processes, one per rank, within a timeout.
"""

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from mgrow.checkpoint import files

from conftest import free_port
from launch_utils import REPO, clean_env, train_job, write_config

TIMEOUT = 60
GOOD_PLAN = {"ops": [{"mlp": {"ffn_hidden_size": 96}}]}


@dataclass
class Case:
    name: str
    error: str  # the start of the line every rank prints: "<field>: <rule...>"
    config: dict = field(default_factory=dict)  # sections merged over the tiny test config (launch_utils)
    argv: tuple = ()  # instead of `train --config <config>`: "{config}", "{tmp}", "{ckpt}" are filled in
    ranks: int = 2
    env: dict = field(default_factory=dict)
    overrides: tuple = ()
    launcher: bool = True  # rank variables set, as torchrun / the deepspeed launcher would
    needs_ranks: bool = False  # refused only once the ranks meet (not before torch is imported)
    files: dict = field(default_factory=dict)  # written under {tmp} first: path -> text (None: a directory)


def plan_event(plan):
    return {"growth": [{"at_step": 2, "plan": plan}]}


CASES = [
    # plans (in a config's growth schedule, or given to grow-checkpoint)
    Case("plan shrinks", "growth[0].plan.ops[0].mlp.ffn_hidden_size: must be >= 64 (the MLP cannot shrink), got 32",
         plan_event({"ops": [{"mlp": {"ffn_hidden_size": 32}}]})),
    Case("plan draws new weights with an infinite std", "growth[0].plan.init.std: must be at most 1 (a finite "
         "number), got inf", plan_event({**GOOD_PLAN, "init": {"std": float("inf")}})),
    Case("plan draws new weights with std 1e30", "growth[0].plan.init.std: must be at most 1 (a finite number), "
         "got 1e+30", plan_event({**GOOD_PLAN, "init": {"std": 1e30}})),
    Case("plan names an unknown operator", "growth[0].plan.ops[0].widen: unknown operator",
         plan_event({"ops": [{"widen": {"hidden_size": 64}}]})),
    Case("plan: heads not divisible by groups", "growth[0].plan.ops[0].heads.num_query_groups: num_attention_heads (6) must be divisible by "
         "num_query_groups (4)",
         plan_event({"ops": [{"heads": {"num_attention_heads": 6, "num_query_groups": 4}}]})),
    Case("plan: layer index out of range", "growth[0].plan.ops[0].layers.insert_before: entry 0 (7) must be a layer index in 0..2",
         plan_event({"ops": [{"layers": {"insert_before": [7]}}]})),
    Case("plan: replicate by a non-integer ratio", "growth[0].plan.ops[0].hidden.hidden_size: replicate needs an integer multiple of 32, got 48",
         plan_event({"ops": [{"hidden": {"hidden_size": 48, "method": "replicate"}}]})),
    Case("plan file missing", "growth[0].plan: plan file /nonexistent/plan.yaml does not exist",
         plan_event("/nonexistent/plan.yaml")),
    Case("growth mask: unknown key", "growth[0].mask.step: unknown key; mask takes steps",
         {"growth": [{"at_step": 2, "plan": GOOD_PLAN, "mask": {"step": 10}}]}),
    Case("plan for another model", "--plan {tmp}/other.yaml: ops[0].hidden.hidden_size: must be >= 32 (the hidden width cannot "
         "shrink), got 16 (checkpoint {ckpt}/step_00000002)",
         argv=("grow-checkpoint", "--in", "{ckpt}", "--plan", "{tmp}/other.yaml", "--out", "{tmp}/out"),
         ranks=1, launcher=False),
    # model configs
    Case("unknown model key", "model.num_layerz: unknown model key", {"model": {"num_layerz": 2}}),
    Case("heads not divisible by TP", "model.num_attention_heads: 3 heads must be divisible by tensor parallel size 2",
         {"parallel": {"tp": 2}, "model": {"num_attention_heads": 3, "num_query_groups": 3, "kv_channels": 8}}),
    Case("groups incompatible with TP", "model.num_query_groups: 6 query groups and tensor parallel size 4: one must divide the other",
         {"parallel": {"tp": 4}, "model": {"num_attention_heads": 12, "num_query_groups": 6, "kv_channels": 8}},
         ranks=4),
    Case("a pipeline split megatron refuses", "model.num_layers_in_first_pipeline_stage: first 1 + last 1 layers must be all 3 layers at pp = 2",
         {"parallel": {"pp": 2}, "model": {"num_layers": 3, "num_layers_in_first_pipeline_stage": 1,
                                           "num_layers_in_last_pipeline_stage": 1}}),
    Case("vocabulary smaller than the byte corpus", "model.vocab_size: the byte-level corpus needs >= 256 tokens",
         {"model": {"vocab_size": 128}}),
    # training configs
    Case("unknown section", "trainer: unknown section", {"trainer": {"steps": 3}}),
    Case("global batch not divisible", "train.global_batch_size: 6 must be divisible by micro_batch_size*dp",
         {"train": {"global_batch_size": 6}}),
    Case("ZeRO with pipeline parallelism", "parallel.pp: optimizer zero2 (DeepSpeed ZeRO) runs with pp = 1",
         {"optimizer": {"type": "zero2"}, "parallel": {"pp": 2}}),
    Case("sequence longer than the model's", "train.seq_length: 64 exceeds model.max_sequence_length 32",
         {"train": {"seq_length": 64}}),
    Case("warmup not shorter than the decay", "optimizer.warmup_steps: must be >= 0 and < the decay steps",
         {"optimizer": {"warmup_steps": 5}}),
    Case("DeepSpeed stage contradicts the optimizer", "deepspeed.zero_optimization.stage: 3 contradicts",
         {"optimizer": {"type": "zero2"}, "deepspeed": {"zero_optimization": {"stage": 3}}}),
    Case("DeepSpeed precision contradicts the model", "deepspeed.bf16.enabled: True contradicts model.bf16 False",
         {"optimizer": {"type": "zero2"}, "deepspeed": {"bf16": {"enabled": True}}}),
    Case("missing data file", "data.path: missing data file /nonexistent/corpus_train.bin",
         {"data": {"path": "/nonexistent/corpus", "sources": []}}),
    Case("unknown W&B mode", "wandb.mode: must be one of offline | online | disabled", {"wandb": {"mode": "cloud"}}),
    Case("negative checkpoint interval", "checkpoint.interval: must be >= 0", {"checkpoint": {"interval": -1}}),
    Case("transfer: unknown component", "transfer.components[1]: must be one of embeddings | norms | mlp | "
         "output_layer | attention | attention_output, got 'attn'",
         {"transfer": {"from": "{ckpt}", "components": ["embeddings", "attn"]}}),
    Case("transfer: a component the models do not share", "transfer.components[0]: the checkpoint's model has "
         "ffn_hidden_size = 64, the model being trained 96: they must agree",
         {"model": {"ffn_hidden_size": 96}, "transfer": {"from": "{ckpt}", "components": ["mlp"]}}),
    # files that are not what they should be
    Case("YAML syntax error in the config", "--config: config file {tmp}/broken.yaml is not valid YAML: expected ',' "
         "or '}', but got '<stream end>' at line 2, column 1", argv=("train", "--config", "{tmp}/broken.yaml"),
         files={"broken.yaml": "model: {num_layers: 2\n"}),
    Case("YAML syntax error in a plan", "growth[0].plan: plan file {tmp}/broken_plan.yaml is not valid YAML",
         {"growth": [{"at_step": 2, "plan": "{tmp}/broken_plan.yaml"}]}, files={"broken_plan.yaml": "ops: [\n"}),
    Case("YAML syntax error in an override", "train.steps: the override 'train.steps=[' is not valid YAML",
         overrides=("train.steps=[",)),
    Case("config path is a directory", "--config: config file {tmp}/a_folder is a directory, not a file",
         argv=("train", "--config", "{tmp}/a_folder"), files={"a_folder": None}),
    Case("plan path is a directory", "growth[0].plan: plan file {tmp}/a_folder is a directory, not a file",
         {"growth": [{"at_step": 2, "plan": "{tmp}/a_folder"}]}, files={"a_folder": None}),
    Case("data file is a directory", "data.path: data file {tmp}/corpus_train.bin is not a file",
         {"data": {"path": "{tmp}/corpus", "sources": []}}, files={"corpus_train.bin": None}),
    Case("config nested 10,000 deep", "--config: config file {tmp}/deep.yaml: nested deeper than 64 levels",
         argv=("train", "--config", "{tmp}/deep.yaml"), files={"deep.yaml": "x: " + "[" * 10000 + "]" * 10000}),
    Case("YAML alias bomb", "--config: config file {tmp}/bomb.yaml: YAML aliases (*alias of an &anchor) are not "
         "allowed", argv=("train", "--config", "{tmp}/bomb.yaml"),
         files={"bomb.yaml": "deepspeed:\n  a: &a [x, x, x, x, x, x, x, x, x]\n  b: &b [*a, *a, *a, *a, *a, *a]\n"
                             "  c: [*b, *b, *b, *b, *b, *b, *b, *b]\n"}),
    # growth events that would never fire
    Case("growth event beyond train.steps", "growth[0].at_step: 9 is due at step 9, and training ends after "
         "train.steps = 5: the event would never fire", {"growth": [{"at_step": 9, "plan": GOOD_PLAN}]}),
    Case("at_tokens event listed before an earlier at_step", "growth[1].at_step: 2 comes before growth[0], which "
         "fires at step 3", {"growth": [{"at_tokens": 768, "plan": GOOD_PLAN},
                                        {"at_step": 2, "plan": {"ops": [{"mlp": {"ffn_hidden_size": 128}}]}}]}),
    # CLI flags
    Case("stale launcher variables with --nproc", "--nproc: 2 local ranks asked for, but RANK and WORLD_SIZE = 4 "
         "are set", argv=("train", "--config", "{tmp}/config.yaml", "--nproc", "2"), ranks=1, env={"WORLD_SIZE": "4"}),
    Case("config file missing", "--config: config file /nonexistent.yaml does not exist",
         argv=("train", "--config", "/nonexistent.yaml")),
    Case("override without '='", "train.steps: an override must look like section.key=value",
         overrides=("train.steps",)),
    Case("verify --tp 0", "--tp: must be >= 1, got 0",
         argv=("verify", "--model", str(REPO / "configs/models/tiny.yaml"), "--plan",
               str(REPO / "configs/plans/all_ops.yaml"), "--tp", "0"), ranks=1, launcher=False),
    # checkpoints
    Case("corrupted checkpoint metadata", "{ckpt}/step_00000002/mgrow.json: corrupted (not JSON",
         {"checkpoint": {"load": "{ckpt}"}}, env={"corrupt": "mgrow.json"}),
    Case("latest names a missing step", "{ckpt}/latest: names step_00000009, which is not there", {"checkpoint": {"load": "{ckpt}"}},
         env={"corrupt": "latest"}),
    Case("fuse: two models of different configs", "--b: model.hidden_size: fusion needs two models of one config: "
         "48 here, 32 in the first model",
         argv=("fuse", "--a", "{ckpt}", "--b", "{tmp}/other_ckpt", "--out", "{tmp}/fused"),
         env={"corrupt": "other model"}),
    Case("checkpoint to load does not exist", "checkpoint.load: /nonexistent/ckpt does not exist",
         {"checkpoint": {"load": "/nonexistent/ckpt"}}),
    Case("grow-checkpoint of a folder that holds no checkpoint", "--in: {tmp}/empty holds no checkpoint mgrow "
         "reads; expected an mgrow root or step folder",
         argv=("grow-checkpoint", "--in", "{tmp}/empty", "--plan", str(REPO / "configs/plans/all_ops.yaml"),
               "--out", "{tmp}/out"), files={"empty": None}),
    Case("grow-checkpoint of a half-written Megatron-LM iteration", "{tmp}/mlm/iter_0000004/metadata.json: "
         "missing: dist_checkpointing writes it last, so the iteration folder is half-written",
         argv=("grow-checkpoint", "--in", "{tmp}/mlm", "--plan", str(REPO / "configs/plans/all_ops.yaml"),
               "--out", "{tmp}/out"),
         files={"mlm/latest_checkpointed_iteration.txt": "4", "mlm/iter_0000004": None}),
    Case("import-hf of a config key mgrow cannot represent", "--from: config.json attention_bias: True is not "
         "supported (mgrow builds False)",
         argv=("import-hf", "--from", "{tmp}/hf", "--out", "{tmp}/out"),
         files={"hf/config.json": json.dumps({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
                                              "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 300,
                                              "max_position_embeddings": 64, "attention_bias": True}),
                "hf/model.safetensors": ""}),
    Case("export-hf into a family that cannot express the model", "--in (model.normalization): 'RMSNorm' where the "
         "family has 'LayerNorm': a gpt2 model cannot express it",
         argv=("export-hf", "--in", "{ckpt}", "--out", "{tmp}/out", "--family", "gpt2"), ranks=1, launcher=False),
    Case("grow-checkpoint of a DeepSpeed root whose latest names nothing", "{tmp}/ds/latest: names 'global_step9', "
         "which holds neither mgrow.json nor mp_rank_00_model_states.pt",
         argv=("grow-checkpoint", "--in", "{tmp}/ds", "--plan", str(REPO / "configs/plans/all_ops.yaml"),
               "--out", "{tmp}/out"), files={"ds/latest": "global_step9"}),
    # launcher environment
    Case("world size not a multiple of tp*pp", "parallel: tp*pp = 2*1 = 2 must divide the world size 3",
         {"parallel": {"tp": 2}}, ranks=3),
    Case("verify: tp*pp*dp is not the world size", "--dp: tp*pp*dp = 4 must equal the launcher's WORLD_SIZE 2",
         argv=("verify", "--model", str(REPO / "configs/models/tiny.yaml"), "--plan",
               str(REPO / "configs/plans/all_ops.yaml"), "--tp", "2", "--dp", "2")),
    Case("unreachable rendezvous", "MASTER_ADDR: no rendezvous with rank 0 at 127.0.0.1:",
         {"parallel": {"timeout_minutes": 0.05}}, ranks=1, env={"RANK": "1", "WORLD_SIZE": "2"}, needs_ranks=True),
]


# Run as real processes too: the cases that need ranks, and one of each kind of the others.
# as real rank processes too: a sample of the catalog, and every case of issue 22's hostile-user list
LAUNCHED = [c for c in CASES if c.needs_ranks] + [c for c in CASES if c.name in (
    "plan shrinks", "latest names a missing step", "world size not a multiple of tp*pp", "verify --tp 0",
    "plan draws new weights with an infinite std", "plan draws new weights with std 1e30",
    "YAML syntax error in the config", "YAML syntax error in a plan", "YAML syntax error in an override",
    "config path is a directory", "plan path is a directory", "data file is a directory",
    "config nested 10,000 deep", "YAML alias bomb", "growth event beyond train.steps",
    "at_tokens event listed before an earlier at_step", "stale launcher variables with --nproc")]
BEFORE_TORCH = [c for c in CASES if not c.needs_ranks]
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of the tiny test model (one rank, 2 AdamW steps) for the checkpoint cases."""
    tmp = tmp_path_factory.mktemp("catalog_checkpoint")
    config = write_config(tmp, train={"steps": 2}, optimizer={"warmup_steps": 1},
                          checkpoint={"save": str(tmp / "ckpt")})
    done = train_job(tmp, 1, config)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "ckpt"


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fill(text: str, tmp: Path, ckpt: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{ckpt}", str(ckpt))


def prepare(case: Case, tmp_path: Path, checkpoint: Path) -> list[str]:
    """The case's files under ``tmp_path`` (a checkpoint copy, corrupted as the case says, a config); its argv."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    for name, text in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text(text)
    if case.env.get("corrupt") == "mgrow.json":
        (ckpt / "step_00000002" / "mgrow.json").write_text("{ not json")
    if case.env.get("corrupt") == "other model":  # a copy whose metadata holds a wider model
        shutil.copytree(checkpoint, tmp_path / "other_ckpt")
        metadata_path = tmp_path / "other_ckpt" / "step_00000002" / "mgrow.json"
        metadata = json.loads(metadata_path.read_text())
        metadata["model"]["hidden_size"] = 48
        metadata["checksum"] = files.content_checksum(metadata)  # sealed as a real checkpoint of it would be
        metadata_path.write_text(json.dumps(metadata))
    if case.env.get("corrupt") == "latest":
        (ckpt / "latest").write_text("step_00000009")
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({"ops": [{"hidden": {"hidden_size": 16}}]}))
    sections = yaml.safe_load(fill(yaml.safe_dump(case.config), tmp_path, ckpt))
    config = write_config(tmp_path, **{k: v for k, v in sections.items() if k not in ("growth", "trainer")})
    raw = yaml.safe_load(config.read_text())
    raw.update({k: v for k, v in sections.items() if k in ("growth", "trainer")})
    config.write_text(yaml.safe_dump(raw))
    return [fill(a, tmp_path, ckpt) for a in case.argv] or ["train", "--config", str(config), *case.overrides]


def rank_env(case: Case, rank: int, port: str) -> dict:
    """The variables a launcher gives this rank (none without one), and the case's own."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    if case.launcher:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(case.ranks), LOCAL_WORLD_SIZE=str(case.ranks))
    env.update({k: v for k, v in case.env.items() if k != "corrupt"})
    return env


def check_rank(case: Case, rank: int, code: int, stderr: str, tmp_path: Path) -> None:
    expected = "mgrow: error: " + fill(case.error, tmp_path, tmp_path / "ckpt")
    lines = [line for line in stderr.splitlines() if line.startswith("mgrow: error: ")]
    assert len(lines) == 1 and lines[0].startswith(expected), f"rank {rank}: {stderr[-2000:]}"
    assert code == 2, (rank, code)


def test_the_in_process_cases_are_refused_before_torch_is_imported(tmp_path, checkpoint):
    """Every in-process case, each rank's environment in turn, in one process where importing torch fails."""
    runs = []
    for index, case in enumerate(BEFORE_TORCH):
        folder = tmp_path / str(index)
        folder.mkdir()
        runs.append((prepare(case, folder, checkpoint), [rank_env(case, rank, "1") for rank in range(case.ranks)]))
    script = """
import contextlib, io, json, os, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported while refusing a bad input")
sys.meta_path.insert(0, NoTorch())
from mgrow.cli import main
results = []
for argv, envs in json.loads(sys.argv[1]):
    for env in envs:
        saved = dict(os.environ)
        os.environ.update(env)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except BaseException as error:
                code = repr(error)
        os.environ.clear()
        os.environ.update(saved)
        results.append([code, err.getvalue()])
print(json.dumps(results))
"""
    done = subprocess.run([sys.executable, "-c", script, json.dumps(runs)], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=REPO, env={**clean_env(), "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = iter(json.loads(done.stdout.splitlines()[-1]))
    for index, case in enumerate(BEFORE_TORCH):
        for rank in range(case.ranks):
            code, stderr = next(results)
            check_rank(case, rank, code, stderr, tmp_path / str(index))


@pytest.mark.parametrize("case", BEFORE_TORCH, ids=[c.name for c in BEFORE_TORCH])
def test_a_bad_input_is_refused_with_its_field_on_every_rank(case, tmp_path, checkpoint, monkeypatch):
    from mgrow.cli import main

    argv = prepare(case, tmp_path, checkpoint)
    before = snapshot(tmp_path)
    for rank in range(case.ranks):
        with monkeypatch.context() as patch:
            for name in RANK_ENV:
                patch.delenv(name, raising=False)
            for name, value in rank_env(case, rank, str(free_port())).items():
                patch.setenv(name, value)
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                code = main(argv)
        check_rank(case, rank, code, stderr.getvalue(), tmp_path)
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


@pytest.mark.parametrize("case", LAUNCHED, ids=[c.name for c in LAUNCHED])
def test_a_bad_input_is_refused_by_every_rank_process(case, tmp_path, checkpoint):
    """The same as real processes, one per rank, each exiting within the timeout."""
    argv = prepare(case, tmp_path, checkpoint)
    before = snapshot(tmp_path)
    port = str(free_port())
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "mgrow.cli", *argv], cwd=REPO,
                              env={**clean_env(), "PYTHONWARNINGS": "ignore", **rank_env(case, rank, port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(case.ranks)]
    outputs = [proc.communicate(timeout=TIMEOUT) for proc in procs]
    assert time.monotonic() - start < TIMEOUT
    for rank, (proc, (_, stderr)) in enumerate(zip(procs, outputs)):
        check_rank(case, rank, proc.returncode, stderr, tmp_path)
    assert snapshot(tmp_path) == before  # nothing written, nothing changed
