"""No tensor is made without a device in mgrow's code, except where the CPU is the design.

A factory call (``torch.zeros``, ``torch.tensor``, ``torch.Generator``, ...) without a
``device=`` argument makes a CPU tensor; on a CUDA rank that tensor meets CUDA
weights or activations and fails, or is silently slow. Every such call in
``mgrow/`` must name its device (the rank's, the weights', or ``"cpu"`` where the
CPU is meant), unless it is in ALLOWED with the reason it is CPU by design.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mgrow"
FACTORIES = {"zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand", "randint", "randperm", "eye",
             "linspace", "as_tensor", "from_numpy", "Generator", "empty_strided", "scalar_tensor"}
ALLOWED = {
    ("train/data.py", "build_corpus"): "numpy bytes of the corpus file, written to disk; never on a device",
    ("train/data.py", "TokenWindows.__init__"): "the token stream lives in host memory; batches are pinned and moved "
                                          "by the engine",
    ("train/warm_start.py", "bigram_log_probs"): "float64 statistics on rank 0's CPU, broadcast after factorising",
}


def device_less_calls(source: str, module: str) -> list[tuple[str, str, int]]:
    """(module, enclosing function, line) of every torch factory call without a ``device=`` keyword."""
    found, scope = [], []

    class Visitor(ast.NodeVisitor):
        def _scoped(self, node):
            scope.append(node.name)
            self.generic_visit(node)
            scope.pop()

        visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

        def visit_Call(self, node):
            f = node.func
            if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "torch"
                    and f.attr in FACTORIES and not any(k.arg == "device" for k in node.keywords)):
                found.append((module, ".".join(scope), node.lineno))
            self.generic_visit(node)

    Visitor().visit(ast.parse(source))
    return found


def _all_calls() -> list[tuple[str, str, int]]:
    calls = []
    for path in sorted(ROOT.rglob("*.py")):
        calls += device_less_calls(path.read_text(), str(path.relative_to(ROOT)))
    return calls


def test_every_tensor_in_mgrow_names_its_device_or_is_cpu_by_design():
    calls = _all_calls()
    offenders = [f"mgrow/{module}:{line} in {where or 'module level'}" for module, where, line in calls
                 if (module, where) not in ALLOWED]
    assert not offenders, "tensors made without a device (name it, or add the place to ALLOWED with its reason):\n" \
                          + "\n".join(offenders)
    used = {(module, where) for module, where, _ in calls}
    assert set(ALLOWED) <= used, f"stale ALLOWED entries: {set(ALLOWED) - used}"


@pytest.mark.parametrize("line", ["torch.zeros(shape)", "torch.tensor([flag], dtype=torch.int32)",
                                  "torch.Generator().manual_seed(seed)"])
def test_the_guard_catches_a_device_less_tensor_on_the_growth_path(line):
    """The negative control: one device-less tensor added to growth's agreement is flagged."""
    source = (ROOT / "transforms" / "agreement.py").read_text()
    broken = source.replace("    def check(self, error: Optional[BaseException], what: str) -> None:\n",
                            "    def check(self, error: Optional[BaseException], what: str) -> None:\n"
                            f"        flag = {line}\n", 1)
    assert broken != source
    assert device_less_calls(source, "transforms/agreement.py") == []
    assert device_less_calls(broken, "transforms/agreement.py") == [("transforms/agreement.py", "Agreement.check",
                                                                  source[:source.index("    def check(self")]
                                                                  .count("\n") + 2)]
