"""Every model attends through shared.attention: nothing else may call SDPA, nn.MultiheadAttention or flash-attn."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("shared", "services")
ALLOWED = {Path("shared/attention.py")}
BANNED_NAMES = {"scaled_dot_product_attention", "MultiheadAttention", "flash_attn_func", "flash_attn_varlen_func",
                "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_with_kvcache"}


def _offences(source: str) -> list[tuple[int, str]]:
    """(line, what) for every direct use of a banned attention kernel in ``source``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in BANNED_NAMES:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name) and node.id in BANNED_NAMES:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] == "flash_attn"]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] == "flash_attn":
                found.append((node.lineno, f"from {node.module} import ..."))
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name in BANNED_NAMES]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (
            node.value.split(".")[0] == "flash_attn" or node.value in BANNED_NAMES
        ):  # importlib.import_module("flash_attn") or getattr(F, "scaled_dot_product_attention")
            found.append((node.lineno, repr(node.value)))
    return found


def test_the_scanner_catches_every_form() -> None:
    source = "\n".join([
        "import torch.nn.functional as F",
        "from torch.nn.functional import scaled_dot_product_attention",
        "F.scaled_dot_product_attention(q, k, v)",
        "m = torch.nn.MultiheadAttention(8, 2)",
        "from flash_attn import flash_attn_func",
        "import flash_attn.bert_padding",
        "importlib.import_module('flash_attn')",
        "x = 1  # scaled_dot_product_attention in a comment is fine",
    ])
    lines = {line for line, _ in _offences(source)}
    assert lines == {2, 3, 4, 5, 6, 7}


def test_no_module_bypasses_shared_attention() -> None:
    offenders = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel in ALLOWED:
                continue
            offenders += [f"{rel}:{line}: {what}" for line, what in _offences(path.read_text(encoding="utf-8"))]
    assert not offenders, "call shared.attention instead of these direct attention kernels:\n" + "\n".join(offenders)
