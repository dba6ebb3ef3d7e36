"""Reading a compiled program's HLO text (``compiled.as_text()``): its computations and instructions,
which computations an instruction calls, a while loop's trip count, and the attention kernel it runs
(the same text for TPU, GPU and CPU programs)."""

from __future__ import annotations

import re

_NAME = r"%([\w.\-]+)"
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_INSTRUCTION = re.compile(r"^\s+(ROOT )?%([\w.\-]+) = (.*)$", re.DOTALL)
_OPCODE = re.compile(r" ([a-z][a-z0-9\-]*)\(([^)]*)\)")  # the first "op(" after the shape


def computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """HLO text -> ({computation name: its header, instructions (one string each) and closing brace},
    entry name)."""
    out: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if current is None:
            head = re.match(r"(ENTRY )?%([\w.\-]+) ", line)
            if head and line.rstrip().endswith("{"):
                current = head[2]
                out[current] = [line]
                entry = current if head[1] else entry
        elif re.fullmatch(r"\}(, execution_thread=\S+)?", line):
            out[current].append(line)
            current = None
        elif _INSTRUCTION.match(line) or len(out[current]) == 1:
            out[current].append(line)
        else:  # an attribute's text spanning lines (a kernel's metadata): part of the instruction above
            out[current][-1] += "\n" + line
    return out, entry


def called(lines: list[str]) -> list[str]:
    """The computations the instructions ``lines`` call, once per call site."""
    out = []
    for line in lines:
        out += _CALLED.findall(line)
        for branches in _BRANCHES.findall(line):
            out += re.findall(_NAME, branches)
    return out


def instructions(lines: list[str]) -> tuple[dict[str, str], str]:
    """{instruction name: the text right of ``=``} of a computation's ``lines``, and the root's name."""
    out, root = {}, ""
    for line in lines[1:]:
        found = _INSTRUCTION.match(line)
        if found:
            out[found[2]] = found[3]
            root = found[2] if found[1] else root
    return out, root


def opcode(text: str) -> tuple[str, str]:
    """An instruction's text right of ``=`` -> (its opcode, its operands' text); ("", "") if none."""
    found = _OPCODE.search(text)
    return (found[1], found[2]) if found else ("", "")


def integer(defs: dict[str, str], name: str, outer=None) -> int | None:
    """The integer constant ``name`` holds, through copies; ``outer(i)`` resolves element ``i`` of
    the computation's tuple parameter."""
    for _ in range(8):
        op, args = opcode(defs.get(name, ""))
        if op == "constant":
            return int(args) if re.fullmatch(r"-?\d+", args) else None
        if op in ("copy", "bitcast", "convert", "copy-done") and re.findall(_NAME, args):
            name = re.findall(_NAME, args)[0]
            continue
        index = re.search(r"\), index=(\d+)", defs.get(name, ""))
        return outer(int(index[1])) if op == "get-tuple-element" and index and outer else None
    return None


def loop_body(loop: str) -> str:
    """The body computation's name of a while instruction (its text right of ``=``)."""
    return re.search(r"body=%([\w.\-]+)", loop)[1]


def trip_count(computations: dict[str, list[str]], defs: dict[str, str], loop: str) -> int | None:
    """Iterations of the while instruction ``loop`` (its text right of ``=``, in a computation whose
    instructions are ``defs``): XLA's annotation, else ``counter < N`` (or <=, >, >=) with both ends
    constants, the counter's start read from the loop's initial tuple and its step from the body
    (TPU's widened loops advance it by 2, each iteration doing two)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop)
    if known:
        return int(known[1])
    bounds = _compared_bounds(computations, defs, loop)
    if bounds is None:
        return None
    direction, a, b, counter = bounds
    step = _counter_step(computations, loop_body(loop), counter)
    span = {"LT": b - a, "LE": b - a + 1, "GT": a - b, "GE": a - b + 1}.get(direction)
    return None if step is None or span is None else max(0, -(-span // abs(step)))


def _compared_bounds(
    computations: dict[str, list[str]], defs: dict[str, str], loop: str
) -> tuple[str, int, int, int] | None:
    """The loop condition's root ``compare(a, b), direction=D`` with both sides constants, one of them
    the counter's start: (D, a, b, the counter's index in the loop state); None when it is not so."""
    initial = re.findall(_NAME, opcode(loop)[1])
    op, elements = opcode(defs.get(initial[0], "")) if initial else ("", "")
    starts = re.findall(_NAME, elements) if op == "tuple" else []
    counters: list[int] = []  # the tuple index the condition reads the counter from

    def start(i: int) -> int | None:
        counters.append(i)
        return integer(defs, starts[i]) if i < len(starts) else None

    condition = re.search(r"condition=%([\w.\-]+)", loop)
    cond_defs, root = instructions(computations.get(condition[1], [])) if condition else ({}, "")
    op, args = opcode(cond_defs.get(root, ""))
    direction = re.search(r"direction=(\w+)", cond_defs.get(root, ""))
    sides = [integer(cond_defs, name, start) for name in re.findall(_NAME, args)]
    if op != "compare" or direction is None or len(sides) != 2 or None in sides or len(counters) != 1:
        return None
    return direction[1], sides[0], sides[1], counters[0]


def _counter_step(computations: dict[str, list[str]], body: str, index: int) -> int | None:
    """How much the loop ``body`` adds to element ``index`` of its state: the root tuple's element is
    ``add(counter, constant)`` (or ``subtract``); None when it is anything else."""
    defs, root = instructions(computations.get(body, []))
    op, args = opcode(defs.get(root, ""))
    elements = re.findall(_NAME, args) if op == "tuple" else []
    if index >= len(elements):
        return None
    op, args = opcode(defs.get(elements[index], ""))
    if op not in ("add", "subtract"):
        return None
    constants = [c for c in (integer(defs, name) for name in re.findall(_NAME, args)) if c is not None]
    return (constants[0] if op == "add" else -constants[0]) if len(constants) == 1 and constants[0] else None


def attention_kernel(hlo: str) -> str:
    """What a compiled program runs for attention, read from its HLO text: the fused kernels' custom
    calls (cuDNN's fMHA, a Pallas kernel lowered by Triton on GPU or Mosaic on TPU), else XLA's own
    dots and softmax."""
    if "__cudnn$fmha" in hlo:
        return "cudnn_fmha"
    if re.search(r"__gpu\$xla\.gpu\.triton.*mha_(forward|backward)", hlo):
        return "pallas_triton_flash"
    if "tpu_custom_call" in hlo and "splash" in hlo:
        return "pallas_mosaic_splash"
    return "xla_dots"
