from grpo_steps.task import demonstrations, make_preference_pairs, make_splits, sloppy_answer


def test_slips_are_the_classic_systematic_errors():
    assert sloppy_answer("37+48=") == "75"  # 7+8 -> 5, carry dropped: 3+4 -> 7
    assert sloppy_answer("99+99=") == "88"
    assert sloppy_answer("52-38=") == "26"  # 2-8 taken as 8-2
    assert sloppy_answer("12+13=") is None  # no carry: nothing to slip on
    assert sloppy_answer("38-52=") is None and sloppy_answer("7*8=") is None


def test_demonstrations_slip_at_the_configured_rate_and_only_where_a_slip_exists():
    problems = make_splits(0, {"train": 3000}, 99, ["+"])["train"]
    demos = demonstrations(0, problems, 0.6)
    slip_prone = [p for p in problems if sloppy_answer(p.prompt) is not None]
    slipped = [d for p, d in zip(problems, demos, strict=True) if d != p.answer]
    assert all(d == sloppy_answer(p.prompt) for p, d in zip(problems, demos, strict=True) if d != p.answer)
    assert 0.55 < len(slipped) / len(slip_prone) < 0.65
    assert demonstrations(0, problems, 0.0) == [p.answer for p in problems]


def test_splits_are_disjoint_and_seeded():
    a = make_splits(3, {"train": 500, "eval": 50, "test": 100}, 99, ["+", "-"])
    b = make_splits(3, {"train": 500, "eval": 50, "test": 100}, 99, ["+", "-"])
    assert a == b
    prompts = [{p.prompt for p in a[s]} for s in ("train", "eval", "test")]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def test_preference_pairs_prefer_the_right_answer():
    problems = make_splits(0, {"train": 200}, 99, ["+"])["train"]
    for pair in make_preference_pairs(0, problems, 300):
        assert pair["chosen"] == str(eval(pair["prompt"][:-1]))  # noqa: S307 - our own literals
        assert pair["rejected"] != pair["chosen"]
