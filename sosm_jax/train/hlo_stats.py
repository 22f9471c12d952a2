"""What a compiled (optimized, per-device) HLO program does per run: matmul FLOPs, HBM bytes and
collectives, with every loop body counted as many times as the loop runs.

XLA's own `cost_analysis()` counts the body of a `while` loop once, however many times it runs;
a train step with gradient accumulation (a scan over micro-batches) or a chunked linear-attention
scan would be undercounted by its trip count. This walks the HLO text instead: from the entry
computation down through called computations, multiplying by the trip count of each loop (from
the loop's `known_trip_count`, or the constant bound of its condition).

Counted:
- FLOPs of `convolution` and `dot` instructions (2 x result elements x contraction size), inside
  fusions too. Elementwise work is left out (it is small beside the matmuls of these models).
- HBM bytes: operands + result of each instruction at the level of control flow (fusions,
  matmuls, copies, custom calls, collectives ...; not inside a fusion), an estimate in the manner
  of XLA's cost analysis.
- Collectives: count and payload bytes (the result arrays) by kind.
- Custom calls (Pallas kernels) by name, so their FLOPs can be added from what they compute.
"""
from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
                "c128": 16}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
# Instructions that move no data of their own (aliases, control flow, bookkeeping).
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier",
               "add-dependency", "domain", "async-done", "copy-done", "send-done", "recv-done",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "iota"}
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_CALLED_LIST = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass
class HloStats:
  """Per-device totals for one run of the program."""
  flops: float = 0.0
  hbm_bytes: float = 0.0
  collectives: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # kind: [n, bytes]
  loops: list[int] = dataclasses.field(default_factory=list)  # trip count of each loop met
  unknown_trip_counts: int = 0
  # custom calls (Pallas / Mosaic kernels, opaque to the counts above) by instruction name
  # without its numeric suffix, e.g. 'splash_mha_fwd_segmented_residuals': calls per run
  custom_calls: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def collective_count(self) -> float:
    return sum(n for n, _ in self.collectives.values())

  @property
  def collective_bytes(self) -> float:
    return sum(b for _, b in self.collectives.values())


@dataclasses.dataclass
class _Instr:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  args: str    # the text between the opcode's parentheses (a parameter's index, a literal)
  attrs: str   # the text after them (called computations, dims, backend config)


def _split_shape(rest: str) -> tuple[str, str]:
  """'SHAPE opcode(...)...' -> (SHAPE, 'opcode(...)...'); tuple shapes are parenthesised."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(" ")
  return shape, tail


def _parse_instr(line: str) -> _Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  shape, tail = _split_shape(m.group(2))
  opcode, _, args = tail.partition("(")
  depth, end = 1, len(args)
  for i, ch in enumerate(args):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      end = i
      break
  operands = re.findall(r"%([\w.\-]+)", args[:end])
  return _Instr(m.group(1), shape, opcode.strip(), operands, args[:end], args[end + 1:])


def parse_computations(hlo_text: str) -> tuple[dict[str, list[_Instr]], str]:
  """{computation name: instructions}, and the entry computation's name."""
  comps: dict[str, list[_Instr]] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      comps[current] = []
      if header.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.strip() == "}":
      current = None
      continue
    instr = _parse_instr(line)
    if instr is not None:
      comps[current].append(instr)
  return comps, entry


def shape_bytes(shape: str) -> float:
  """Bytes of an array or tuple shape string such as 'bf16[8,128]{1,0}' or '(f32[2], s32[])'."""
  return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dt, dims in _ARRAY.findall(shape))


def _largest_array_bytes(shape: str) -> float:
  return max((_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
              for dt, dims in _ARRAY.findall(shape)), default=0.0)


def _collective_bytes(instr: _Instr, kind: str, shapes: dict[str, str]) -> float:
  """Payload of a collective: its result arrays (several when XLA combined collectives into one);
  an asynchronous start's result also holds its operands, which are not counted twice."""
  total = shape_bytes(instr.shape)
  if instr.opcode.endswith("-start") and kind != "all-reduce":
    total -= sum(shape_bytes(shapes.get(o, "")) for o in instr.operands)
  return max(total, _largest_array_bytes(instr.shape))


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _matmul_flops(instr: _Instr, shapes: dict[str, str]) -> float:
  out = math.prod(_dims(instr.shape))
  if instr.opcode == "dot":
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
    lhs = _dims(shapes.get(instr.operands[0], "")) if instr.operands else []
    idx = [int(i) for i in m.group(1).split(",") if i] if m else []
    return 2.0 * out * math.prod(lhs[i] for i in idx if i < len(lhs))
  m = re.search(r"dim_labels=\w+_(\w+)->", instr.attrs)
  kernel = _dims(shapes.get(instr.operands[1], "")) if len(instr.operands) > 1 else []
  if not m or len(m.group(1)) != len(kernel):
    return 0.0
  # Each output element sums over the kernel's input features times the window taps that land
  # on input elements: with lhs_dilate d a window of w taps meets ceil(w / d) of them (XLA writes
  # batched matmuls as convolutions over "spatial" batch dims with w = d = the batch size).
  window = re.search(r"window=\{([^}]*)\}", instr.attrs)
  dilate = re.search(r"lhs_dilate=([\dx]+)", window.group(1)) if window else None
  dilate = [int(d) for d in dilate.group(1).split("x")] if dilate else []
  taps = 1.0
  for n, label in zip(kernel, m.group(1)):
    if label == "i":
      taps *= n
    elif label.isdigit():
      d = dilate[int(label)] if int(label) < len(dilate) else 1
      taps *= -(-n // d)
  return 2.0 * out * taps


def _trip_count(instr: _Instr, comps: dict[str, list[_Instr]]) -> int | None:
  """The loop's `known_trip_count`, else the one integer constant its condition compares with."""
  m = _TRIP.search(instr.attrs)
  if m:
    return int(m.group(1))
  cond = re.search(r"\bcondition=%?([\w.\-]+)", instr.attrs)
  ints = [int(i.args) for i in (comps.get(cond.group(1), []) if cond else [])
          if i.opcode == "constant" and re.fullmatch(r"-?\d+", i.args)
          and re.match(r"[su]\d+\[\]", i.shape)]
  return ints[0] if len(ints) == 1 and ints[0] > 0 else None


def _param_reads(body: list[_Instr], param: str, full: float, comps, depth: int = 0) -> float:
  """Bytes of a fused computation's parameter that are read: the slices where it is only
  dynamic-sliced (through nested fusions too), nothing where it is updated in place, else all."""
  users = [i for i in body if param in i.operands]
  root = body[-1] if body else None
  total = 0.0
  for user in users:
    if user.opcode == "dynamic-slice" and user.operands[0] == param:
      total += shape_bytes(user.shape)
    elif user.opcode == "dynamic-update-slice" and user.operands[0] == param:
      continue  # updated in place: the update is counted with the result
    elif user.opcode == "fusion" and depth < 8:
      callee = re.search(r"\bcalls=%?([\w.\-]+)", user.attrs)
      inner = comps.get(callee.group(1), []) if callee else []
      names = {int(i.args): i.name for i in inner if i.opcode == "parameter" and i.args.isdigit()}
      for k, operand in enumerate(user.operands):
        if operand == param and k in names:
          total += _param_reads(inner, names[k], full, comps, depth + 1)
    else:
      return full
  return min(total, full)


def _sliced_traffic(instr: _Instr, shapes: dict[str, str], body: list[_Instr], comps) -> float:
  """Bytes a fusion moves: its result and the parts of its operands it reads.

  An operand read only through dynamic-slice costs the slices; a root dynamic-update-slice into
  an operand writes (and the operand costs) only the update, as in XLA's own cost analysis.
  """
  by_name = {i.name: i for i in body}

  def written(name: str) -> float:
    out = by_name.get(name)
    while out is not None and out.opcode == "bitcast" and out.operands:
      out = by_name.get(out.operands[0])
    if out is None:
      return 0.0
    if out.opcode == "dynamic-update-slice" and len(out.operands) > 1:
      return shape_bytes(by_name[out.operands[1]].shape) if out.operands[1] in by_name else 0.0
    return shape_bytes(out.shape)

  root = body[-1] if body else None
  if root is None:
    return shape_bytes(instr.shape)
  total = sum(map(written, root.operands)) if root.opcode == "tuple" else written(root.name)
  for i in body:
    if i.opcode == "parameter" and i.args.isdigit() and int(i.args) < len(instr.operands):
      full = shape_bytes(shapes.get(instr.operands[int(i.args)], ""))
      total += _param_reads(body, i.name, full, comps)
  return total


def _traffic(instr: _Instr, shapes: dict[str, str], comps: dict[str, list[_Instr]]) -> float:
  """HBM bytes of one control-level instruction: its operands and result, sliced where it slices."""
  if instr.opcode == "dynamic-slice":
    return 2.0 * shape_bytes(instr.shape)
  if instr.opcode == "dynamic-update-slice" and len(instr.operands) > 1:
    return 2.0 * shape_bytes(shapes.get(instr.operands[1], ""))
  if instr.opcode == "fusion":
    callee = re.search(r"\bcalls=%?([\w.\-]+)", instr.attrs)
    if callee and callee.group(1) in comps:
      return _sliced_traffic(instr, shapes, comps[callee.group(1)], comps)
  return shape_bytes(instr.shape) + sum(shape_bytes(shapes.get(o, "")) for o in instr.operands)


def hlo_stats(hlo_text: str) -> HloStats:
  """FLOPs, HBM bytes and collectives of one run of a compiled program (see module docstring)."""
  comps, entry = parse_computations(hlo_text)
  stats = HloStats()

  def walk(name: str, mult: float, control: bool, depth: int = 0):
    if depth > 64 or name not in comps:
      return
    instrs = comps[name]
    shapes = {i.name: i.shape for i in instrs}
    for instr in instrs:
      op = instr.opcode
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if op in ("convolution", "dot"):
        stats.flops += mult * _matmul_flops(instr, shapes)
      if op == "custom-call":
        key = re.sub(r"(\.\d+)+$", "", instr.name)
        stats.custom_calls[key] = stats.custom_calls.get(key, 0.0) + mult
      if kind in COLLECTIVES:
        entry_ = stats.collectives.setdefault(kind, [0.0, 0.0])
        entry_[0] += mult
        entry_[1] += mult * _collective_bytes(instr, kind, shapes)
      if control and op not in _NO_TRAFFIC and not op.endswith("-done"):
        stats.hbm_bytes += mult * _traffic(instr, shapes, comps)
      called = _CALLED.findall(instr.attrs)
      for group in _CALLED_LIST.findall(instr.attrs):
        called += [(group[0], c.strip().lstrip("%")) for c in group[1].split(",") if c.strip()]
      trips = 1
      if op == "while":
        trip = _trip_count(instr, comps)
        stats.loops.append(trip or 1)
        stats.unknown_trip_counts += trip is None
        trips = trip or 1
      for role, callee in called:
        if role in ("body", "condition"):
          walk(callee, mult * trips, True, depth + 1)
        elif role == "to_apply":
          continue  # scalar reductions
        else:  # fusions are counted at their call; branches, calls and async wrappers are not
          walk(callee, mult, control and op != "fusion", depth + 1)

  walk(entry, 1.0, True)
  return stats
