"""Where a PTQ reconstruction step goes: the preset's mean step time and a profile of one unit's steps.

The CIMQ preset (``configs/quant/cimq_ptq.yaml``) is fitted through the CLI (`runner.measure`) with ``--steps``
steps per unit; the step time is timed over every step but the first two of each unit (the block's input capture
and, compiled, its compilation: `training_time.UnitStepTimer`). With ``--profile``, ``torch.profiler`` records
steps ``--profile-steps`` (10 to 29) of unit ``--unit`` (0-based: unit 4 is ``layer2.0``, the first 16->32 block) and the top operators by own CPU time are printed per step.
``--copies`` also records input shapes and Python stacks and prints the step's ``aten::copy_`` calls by shape
and by the nearest ``cimq_pl`` caller (which layout copies a step makes, and where); ``--callers OP ...`` prints
the same by-caller table for other operators (``aten::index``, ``aten::random_``: who calls them).
``--adam foreach|fused`` builds the reconstruction's Adam with that implementation instead of PyTorch's default
(the per-parameter loop on the CPU), to see what the optimizer's own loops cost. Two overhead levers of the compiled
path, to time against a plain run in fresh processes: ``--skip-guards`` skips Dynamo's guard checks in the steady
steps of every unit (`SkipGuards`), ``--cpp-wrapper`` has Inductor write the compiled calls' wrapper in C++
(``torch._inductor.config.cpp_wrapper``; the kernels compile afresh, minutes).

    python benchmarks/ptq_step_profile.py --profile                  # ~2 min on 2 cores
    python benchmarks/ptq_step_profile.py --profile --copies         # and where the copies come from
    python benchmarks/ptq_step_profile.py --profile --copies --callers aten::index aten::random_
    python benchmarks/ptq_step_profile.py --adam fused               # the same fit with a fused Adam
    python benchmarks/ptq_step_profile.py --skip-guards              # without Dynamo's guard checks (steady steps)
    python benchmarks/ptq_step_profile.py --cpp-wrapper              # Inductor's C++ wrapper
    python benchmarks/ptq_step_profile.py --drop-psums --profile     # with QDrop on the ADC (partial sums) too
    python benchmarks/ptq_step_profile.py --asymmetric-adc           # with asymmetric ADC ranges
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from lightning.pytorch import Callback

from runner import Setting, base_parser, markdown_table, measure, prepare
from training_time import UnitStepTimer

class UnitProfiler(Callback):
    """``torch.profiler`` over steps ``first`` to ``last - 1`` of unit ``unit`` (of ``steps_per_unit`` steps each)."""

    def __init__(self, unit: int, steps_per_unit: int, first: int = 10, last: int = 30, copies: bool = False):
        self.first, self.last = unit * steps_per_unit + first, unit * steps_per_unit + last
        self.copies = copies  # record shapes and Python stacks for `copy_rows` and `caller_rows`
        self.profile: Optional[torch.profiler.profile] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                  record_shapes=self.copies, with_stack=self.copies)
            self.profile.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.last - 1 and self.profile is not None:
            self.profile.__exit__(None, None, None)

    def rows(self, limit: int = 25) -> list[dict]:
        """The top operators by own CPU time: ms per step, calls per step, share of the profiled time."""
        if self.profile is None:
            return []
        steps = self.last - self.first
        events = sorted(self.profile.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        return [{"op": e.key[:60], "ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 2),
                 "calls_per_step": round(e.count / steps, 1), "share": f"{100 * e.self_cpu_time_total / total:.1f}%"}
                for e in events[:limit]]

    def copy_rows(self) -> list[dict]:
        """The ``aten::copy_`` calls of a step (with ``copies``) by input shape, ms and calls per step, largest
        first (by caller: `caller_rows`)."""
        if self.profile is None or not self.copies:
            return []
        steps = self.last - self.first
        by_shape = [{"shape": str(e.input_shapes[0]) if e.input_shapes else "", "ms_per_step":
                     round(e.self_cpu_time_total / 1000 / steps, 3), "calls_per_step": round(e.count / steps, 1)}
                    for e in self.profile.key_averages(group_by_input_shape=True) if e.key == "aten::copy_"]
        return sorted(by_shape, key=lambda row: -row["ms_per_step"])

    def caller_rows(self, op: str) -> list[dict]:
        """The calls of operator ``op`` in a step (with ``copies``) by their nearest ``cimq_pl`` caller
        (`_caller`): ms and calls per step, largest first."""
        if self.profile is None or not self.copies:
            return []
        steps, callers = self.last - self.first, {}
        for event in self.profile.events():
            if event.name == op:
                total = callers.setdefault(_caller(event), [0.0, 0])
                total[0] += event.self_cpu_time_total
                total[1] += 1
        rows = [{"caller": caller, "ms_per_step": round(us / 1000 / steps, 3), "calls_per_step": round(n / steps, 1)}
                for caller, (us, n) in callers.items()]
        return sorted(rows, key=lambda row: -row["ms_per_step"])


def _caller(event) -> str:
    """The nearest ``cimq_pl`` Python frame among ``event``'s parents (``with_stack`` records them as events), as
    ``quant/fused.py(474): <listcomp>``; else the nearest frame outside ``cimq_pl``, else ``"(no Python frame)"``."""
    frames, parent = [], event.cpu_parent
    while parent is not None:
        if ".py(" in parent.name:
            frames.append(parent.name)
        parent = parent.cpu_parent
    ours = [frame for frame in frames if "cimq_pl/" in frame]  # absolute or relative to the repo
    return ours[0].split("cimq_pl/", 1)[-1] if ours else (frames[0] if frames else "(no Python frame)")


class SkipGuards(Callback):
    """Dynamo's guard checks off (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``) from step ``skip`` of
    every unit of ``steps_per_unit`` steps to its last, on again between units: by then every layer shape of the unit
    has compiled, so only the guards that tell the compiled entries apart still run."""

    def __init__(self, steps_per_unit: int, skip: int = 2):
        self.steps_per_unit, self.skip = steps_per_unit, skip

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx % self.steps_per_unit == self.skip:
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx % self.steps_per_unit == self.steps_per_unit - 1:
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=False)

    def teardown(self, trainer, pl_module, stage) -> None:  # a fit stopped mid-unit
        torch.compiler.set_stance("default", skip_guard_eval_unsafe=False)


@contextlib.contextmanager
def inductor_cpp_wrapper(on: bool):
    """Within the block, Inductor writes the compiled calls' wrapper code in C++ instead of Python (when ``on``)."""
    import torch._inductor.config as inductor

    saved = inductor.cpp_wrapper
    inductor.cpp_wrapper = on or saved
    try:
        yield
    finally:
        inductor.cpp_wrapper = saved


@contextlib.contextmanager
def adam_implementation(name: str):
    """Within the block, ``torch.optim.Adam`` builds its optimizers with ``foreach=True`` or ``fused=True``."""
    if name == "default":
        yield
        return
    original = torch.optim.Adam

    class Adam(original):
        def __init__(self, params, **kwargs):
            super().__init__(params, **{name: True, **kwargs})

    torch.optim.Adam = Adam
    try:
        yield
    finally:
        torch.optim.Adam = original


def main(argv: Optional[list[str]] = None) -> dict:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="PTQ steps per unit (40)")
    parser.add_argument("--simulation", choices=("eager", "compiled"), default="compiled",
                        help="the CIM layers' path (compiled, the preset's `auto` on the CPU)")
    parser.add_argument("--adam", choices=("default", "foreach", "fused"), default="default",
                        help="the reconstruction's Adam implementation (default: PyTorch's choice)")
    parser.add_argument("--drop-psums", action="store_true",
                        help="QDrop on the ADC too (QuantDropping targets with psums; Setting.drop_psums)")
    parser.add_argument("--asymmetric-adc", action="store_true",
                        help="asymmetric ADC ranges (PartialSumClipping asymmetric; Setting.asymmetric_adc)")
    parser.add_argument("--skip-guards", action="store_true",
                        help="skip Dynamo's guard checks in the steady steps of every unit (SkipGuards)")
    parser.add_argument("--cpp-wrapper", action="store_true",
                        help="Inductor's C++ wrapper for the compiled calls (compiles afresh)")
    parser.add_argument("--profile", action="store_true", help="profile --profile-steps of --unit")
    parser.add_argument("--copies", action="store_true",
                        help="with --profile: the step's copies by shape and by caller (records stacks: slower steps)")
    parser.add_argument("--callers", nargs="+", default=[], metavar="OP",
                        help="with --copies: also list these operators' calls by caller (e.g. aten::index)")
    parser.add_argument("--unit", type=int, default=4, help="the profiled unit, 0-based (4: layer2.0)")
    parser.add_argument("--profile-steps", type=int, nargs=2, default=[10, 30], metavar=("FIRST", "END"),
                        help="the profiled steps of the unit, FIRST to END - 1 (10 30)")
    args = parser.parse_args(argv)
    first, end = args.profile_steps
    if args.profile and not 0 <= first < end <= args.steps:
        parser.error(f"--profile-steps {first} {end}: expected 0 <= FIRST < END <= --steps ({args.steps})")
    if args.steps < 3:
        parser.error(f"--steps={args.steps}: the timer skips the first two steps of a unit, give at least 3")
    extra = prepare(args)
    timer = UnitStepTimer(args.steps)
    if args.copies and not args.profile:
        parser.error("--copies lists what --profile records: give both")
    if args.callers and not args.copies:
        parser.error("--callers needs the stacks --copies records: give --profile --copies too")
    profiler = UnitProfiler(args.unit, args.steps, first, end, args.copies) if args.profile else None
    callbacks = [timer, *([profiler] if profiler else []), *([SkipGuards(args.steps)] if args.skip_guards else [])]
    with adam_implementation(args.adam), inductor_cpp_wrapper(args.cpp_wrapper):
        measure(Setting("resnet20", "cimq", iters=args.steps, drop_psums=args.drop_psums or None,
                        asymmetric_adc=args.asymmetric_adc or None), args.work_dir,
                extra_args=[*extra, "--model.simulation", args.simulation], callbacks=callbacks, test=False)
    summary = {"simulation": args.simulation, "adam": args.adam, "QDrop on the ADC": args.drop_psums,
               "asymmetric ADC": args.asymmetric_adc, "guards skipped": args.skip_guards,
               "C++ wrapper": args.cpp_wrapper,
               "steps per unit": args.steps,
               "timed steps": timer.steps, "ms per step": round(1000 / timer.steps_per_second, 2)}
    print("\n" + markdown_table([summary], list(summary), list(summary)))
    rows = profiler.rows() if profiler else []
    if rows:
        print(f"\nUnit {args.unit}, steps {first}-{end - 1} (torch.profiler, own CPU time):\n")
        print(markdown_table(rows, ["op", "ms_per_step", "calls_per_step", "share"],
                             ["operator", "ms per step", "calls per step", "share"]))
    by_shape = profiler.copy_rows() if profiler else []
    if by_shape:
        print(f"\nUnit {args.unit}, aten::copy_ by input shape:\n")
        print(markdown_table(by_shape[:15], ["shape", "ms_per_step", "calls_per_step"],
                             ["shape", "ms per step", "calls per step"]))
    callers = {op: profiler.caller_rows(op) for op in ["aten::copy_", *args.callers]} if profiler else {}
    for op, op_rows in callers.items():
        if op_rows:
            print(f"\nUnit {args.unit}, {op} by caller (nearest cimq_pl frame):\n")
            print(markdown_table(op_rows[:15], ["caller", "ms_per_step", "calls_per_step"],
                                 ["caller", "ms per step", "calls per step"]))
    return {**summary, "profile": rows, "copies_by_shape": by_shape, "copies_by_caller": callers.get("aten::copy_", []),
            "callers": callers}


if __name__ == "__main__":
    main()
