import pytest

from grpo_steps.data.task import Problem, demonstrations, make_preference_pairs, make_splits, sloppy_answer


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


def test_reasoning_format_works_column_by_column_and_the_slip_drops_every_carry():
    from grpo_steps.data.task import question, reasoning_rejected, worked_solution

    assert question("37+48=") == "What is 37 + 48?"
    assert worked_solution("37+48=", "85") == "7 + 8 = 15, 3 + 4 + 1 = 8. #### 85"
    assert worked_solution("37+48=", "85", slip=True) == "7 + 8 = 15, 3 + 4 = 7. #### 75"
    assert worked_solution("45+57=", "102") == "5 + 7 = 12, 4 + 5 + 1 = 10. #### 102"
    problems = make_splits(0, {"train": 500}, 99, ["+"])["train"]
    for p in problems:  # the worked answer is the answer; the slipped one is exactly the teacher's slip
        assert worked_solution(p.prompt, p.answer).endswith(f"#### {p.answer}")
        slip = sloppy_answer(p.prompt)
        assert worked_solution(p.prompt, p.answer, slip=True).endswith(f"#### {slip or p.answer}")
    assert reasoning_rejected("37+48=", "85", "75", "slip") == worked_solution("37+48=", "85", slip=True)
    assert reasoning_rejected("37+48=", "85", "86", "offset").endswith("3 + 4 + 1 = 8. #### 86")
    # subtraction: one line of working; the teacher's slip (no borrowing) shows in it
    assert worked_solution("52-38=", "14") == "52 - 38 = 14. #### 14"
    assert reasoning_rejected("52-38=", "14", "26", "slip") == "52 - 38 = 26. #### 26"


def test_verbose_working_names_each_column_and_its_number_so_far_and_the_slip_leaves_out_the_carry():
    import re

    from grpo_steps.data.task import reasoning_rejected, worked_solution

    assert worked_solution("37+48=", "85", working="verbose") == (
        "ones: 7 + 8 = 15, write 5, carry 1, so far 5. tens: 3 + 4 + 1 = 8, write 8, so far 85. #### 85")
    assert worked_solution("37+48=", "85", slip=True, working="verbose") == (
        "ones: 7 + 8 = 15, write 5, so far 5. tens: 3 + 4 = 7, write 7, so far 75. #### 75")
    assert worked_solution("95+57=", "152", working="verbose").endswith(
        "tens: 9 + 5 + 1 = 15, write 5, carry 1, so far 52. last carry: so far 152. #### 152")
    assert worked_solution("72+33=", "105", slip=True, working="verbose").endswith("so far 05. #### 5")
    problems = make_splits(0, {"train": 300}, 999999, ["+"])["train"]
    problems += [Problem(f"{a}+{b}=", str(a + b)) for a, b in ((0, 0), (100, 5), (5, 100), (999999, 1), (1, 9))]
    for p in problems:  # every column's sentence; the last digits so far are the answer, the slip the teacher's
        a, b = p.prompt[:-1].split("+")
        text = worked_solution(p.prompt, p.answer, working="verbose")
        assert text.count("write") == max(len(a), len(b))
        assert re.findall(r"so far (\d+)", text)[-1] == p.answer
        assert text.endswith(f"#### {p.answer}")
        slip = sloppy_answer(p.prompt) or p.answer
        slipped = worked_solution(p.prompt, p.answer, slip=True, working="verbose")
        assert "carry" not in slipped and slipped.endswith(f"#### {slip}")
        assert re.findall(r"so far (\d+)", slipped)[-1].lstrip("0") == slip.lstrip("0")  # `so far 05. #### 5`
        assert reasoning_rejected(p.prompt, p.answer, "1", "offset", "verbose") == text.replace(
            f"#### {p.answer}", "#### 1")
    with pytest.raises(ValueError, match="working must be one of"):
        worked_solution("37+48=", "85", working="long")


def test_bpe_tokenizer_reads_numbers_digit_by_digit_and_carries_a_chat_template():
    from grpo_steps.data.prompts import render
    from grpo_steps.data.tokenizer import CHAT_END, build_bpe_tokenizer

    tok = build_bpe_tokenizer(["What is 37 + 48?", "7 + 8 = 15, 3 + 4 + 1 = 8. #### 85"] * 50, vocab_size=300)
    pieces = tok.tokenize("#### 1234")
    assert [p.lstrip("Ġ") for p in pieces if p.lstrip("Ġ").isdigit()] == ["1", "2", "3", "4"]
    assert tok.eos_token == CHAT_END and render(tok, "What is 1 + 2?").endswith("<|im_start|>assistant\n")
    assert tok.decode(tok("7 + 8 = 15. #### 85", add_special_tokens=False)["input_ids"]) == "7 + 8 = 15. #### 85"
