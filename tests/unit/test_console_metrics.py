"""Reading verl's console metrics back from a run log, including lines Ray's log streaming cut in two."""

from tip_verl.verl_adapter.console_metrics import parse_console_metrics

P = "\x1b[36m(TaskRunnerV1 pid=26591)\x1b[0m "
Q = "\x1b[36m(WorkerDict pid=4132)\x1b[0m "


def test_a_step_line_cut_by_ray_is_joined_again():
    log = "\n".join([
        P + "step:41 - global_seqlen/max:6016.0 - tip/kept_count:1090.0 - actor/lr:np.float64(0.0003)",
        P + "Training Progress:  70%|███       | 42/60 [06:00<02:34,  8.6s/it]",
        P + "step:42 - global_seqlen/min:6016.0 - global_seq",  # cut inside a key
        P + "len/max:6016.0 - tip/kept_count:1101.0 - timing_s/step:9.",  # ... and inside a value
        P + "45",
        P + "Training Progress:  72%|███       | 43/60 [06:09<02:25,  8.6s/it]",
        P + "step:43 - tip/kept_count:1200.0",
        Q + "len/max:1.0 - tip/kept_count:5.0",  # another process's line is never glued on
    ])
    steps = parse_console_metrics(log)
    assert steps[41] == {"global_seqlen/max": 6016.0, "tip/kept_count": 1090.0, "actor/lr": 0.0003}
    assert steps[42] == {"global_seqlen/min": 6016.0, "global_seqlen/max": 6016.0, "tip/kept_count": 1101.0,
                         "timing_s/step": 9.45}
    assert steps[43] == {"tip/kept_count": 1200.0}


def test_plain_lines_without_ray_prefix():
    steps = parse_console_metrics("step:1 - a:1.0 - b:np.float32(2.5) - c:text\nstep:2 - a:3")
    assert steps == {1: {"a": 1.0, "b": 2.5}, 2: {"a": 3.0}}
