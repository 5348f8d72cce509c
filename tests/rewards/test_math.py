"""Math rewards graded on known model outputs: (response, reference, strict, flexible, math_verify)."""

import threading

import pytest

import lit_rlhf.rewards.math as lit_math
from lit_rlhf.rewards import RewardBatch, RewardFunction
from lit_rlhf.rewards.math import gsm8k_flexible, gsm8k_strict, math_verify

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
)

# GSM8K-style outputs against a numeric reference
GSM8K = [
    ("She sold 48 + 24 = 72 clips.\n#### 72", "72", 1, 1),
    ("#### 72", GSM8K_SOLUTION, 1, 1),  # the reference is a whole GSM8K solution
    ("The total is 72.", "72", 0, 1),  # no '####': strict says no
    ("#### 1,000", "1000", 1, 1),  # thousands separators
    ("It costs $1,234.50 in all. #### $1,234.50", "1234.5", 1, 1),  # a dollar sign, trailing zero
    ("#### 18.00", "18", 1, 1),  # equal by value
    ("The answer is 18 dollars.\n#### 18 dollars", "18", 1, 1),  # units after the number
    ("#### -5", "-5", 1, 1),  # negative
    ("The temperature fell to -5 degrees. #### 5", "-5", 0, 0),  # a sign lost
    ("#### 12\nWait, I made a mistake: it is 14.\n#### 14", "14", 1, 1),  # the last '####' counts
    ("#### 14\nor maybe 12", "14", 1, 0),  # flexible takes the last number
    ("I do not know.", "72", 0, 0),  # no answer at all
    ("", "72", 0, 0),  # empty
    ("#### seventy-two", "72", 0, 0),  # a word is not a number
    ("48/2 = 24, 48 + 24 = 72", "72", 0, 1),
    ("#### 0.5", "0.5", 1, 1),
    ("#### .5", "0.5", 1, 1),
    ("#### 3.14159", "3.14", 0, 0),  # no rounding
    ("There are 1,2,3 steps. #### 6", "6", 1, 1),
    ("#### 7.", "7", 1, 1),  # a sentence's full stop
    ("So 5 apples. Answer: 5", "5", 0, 1),
    ("####72", "72", 1, 1),  # no space
    ("#### 100000", "100,000", 1, 1),  # a reference with separators
    ("#### 42\n", "#### 42", 1, 1),
    ("#### 1,2345", "12345", 1, 0),  # strict reads the token as verl does (commas dropped)
    ("####  $ 7.", "7", 1, 1),
]

# MATH-style outputs against a LaTeX reference: (response, reference, math_verify)
MATH = [
    ("So the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", 1),
    ("The answer is \\boxed{0.5}", "\\frac{1}{2}", 1),  # a fraction by value
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac34", 1),
    ("Thus $x = \\boxed{\\sqrt{2}}$", "\\sqrt{2}", 1),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0),
    ("The answer is \\boxed{\\boxed{5}}", "5", 1),  # nested boxes
    ("\\boxed{(2, 3]}", "(2,3]", 1),  # an interval
    ("\\boxed{[2, 3]}", "(2,3]", 0),  # its ends differ
    ("\\boxed{\\pi}", "\\pi", 1),
    ("\\boxed{3.14}", "\\pi", 0),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1),  # equal expressions
    ("\\boxed{-7}", "-7", 1),
    ("\\boxed{7}", "-7", 0),
    ("I cannot solve this.", "5", 0),  # no answer
    ("", "5", 0),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}", 1),  # a set in any order
    ("\\boxed{10\\%}", "10", 1),  # a percent sign
    ("First I guess 4, then \\boxed{6}", "6", 1),  # the boxed answer counts
    ("The answer is 12.", "12", 1),  # unboxed, the last expression
    ("\\boxed{1,000}", "1000", 1),
]


@pytest.mark.parametrize(("response", "reference", "strict", "flexible"), GSM8K)
def test_gsm8k_rewards_grade_known_outputs(response, reference, strict, flexible):
    assert gsm8k_strict([""], [response], [reference]) == [float(strict)]
    assert gsm8k_flexible([""], [response], [reference]) == [float(flexible)]


@pytest.mark.parametrize(("response", "reference", "expected"), MATH)
def test_math_verify_grades_known_outputs(response, reference, expected):
    assert math_verify([""], [response], [reference]) == [float(expected)]


def test_the_fixture_is_large_enough():
    assert len(GSM8K) + len(MATH) >= 40


def on_a_helper_thread(fn, *args):
    """``fn(*args)`` on another thread, as a RewardFunction calls it: its result, or the error it raised."""
    got = []

    def call():
        try:
            got.append(fn(*args))
        except Exception as error:  # noqa: BLE001  (handed back to the test)
            got.append(error)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    return got[0]


def test_math_verify_on_a_helper_thread_grades_as_on_the_main_thread():
    responses = [r for r, _, _ in MATH]
    references = [ref for _, ref, _ in MATH]
    assert on_a_helper_thread(math_verify, [""] * len(MATH), responses, references) == [float(e) for _, _, e in MATH]
    error = on_a_helper_thread(math_verify, [""], ["\\boxed{3}"], [" "])
    assert isinstance(error, ValueError) and "cannot parse the reference" in str(error)


def test_a_response_math_verify_cannot_finish_scores_zero_and_its_process_is_replaced():
    """Off the main thread math-verify's own timeouts are off, so a pair runs in a worker process with a
    deadline: past it the process is killed and the pair scores 0; the next pair gets a new process."""
    worker = lit_math._Worker()
    worker.deadline_s = 0.5  # the nested braces below take math-verify seconds
    nested = "\\boxed{" + "{" * 20 + "1" + "}" * 20 + "}"
    try:
        assert worker.grade("\\boxed{2}", "2") == 1.0
        first = worker.process.pid
        assert worker.grade(nested, "1") == 0.0 and worker.process is None
        assert worker.grade("\\boxed{2}", "3") == 0.0 and worker.process.pid != first
        assert worker.grade("\\boxed{x}", " ") is None  # the reference is unparsable
    finally:
        worker.stop()


def test_a_long_run_of_spaces_after_the_hashes_is_graded_in_linear_time():
    """A degenerate response (200,000 spaces after '####'): the answer pattern does not backtrack over
    the run twice (it took minutes before; the reward's deadline cannot interrupt a regex)."""
    assert gsm8k_strict([""], ["#### " + " " * 200_000 + "x"], ["5"]) == [0.0]
    assert gsm8k_strict([""], ["#### " + "\n" * 200_000 + "5"], ["5"]) == [1.0]


def test_as_reward_functions_they_read_the_answer_column():
    component = RewardFunction(fn="lit_rlhf.rewards.math.gsm8k_strict")
    batch = RewardBatch(prompts=["q1", "q2"], responses=["#### 3", "#### 4"], columns={"answer": ["3", "5"]})
    assert [float(x) for x in component.score(batch)] == [1.0, 0.0]


def test_a_reference_that_is_not_a_number_is_an_error_naming_it():
    with pytest.raises(ValueError, match="not a number.*math_verify"):
        gsm8k_strict([""], ["#### 3"], ["three"])
    with pytest.raises(ValueError, match="cannot parse the reference"):
        math_verify([""], ["\\boxed{3}"], [" "])  # an empty reference
    with pytest.raises(ValueError, match="2 responses but 1 reference"):
        gsm8k_flexible(["", ""], ["1", "2"], ["1"])


@pytest.mark.parametrize("missing", [None, float("nan"), "nan", "inf", "sNaN"])
def test_a_missing_or_non_finite_reference_is_an_error_not_a_zero(missing):
    with pytest.raises(ValueError, match="missing|not a number"):
        gsm8k_strict([""], ["#### 5"], [missing])
    if missing is None or isinstance(missing, float):
        with pytest.raises(ValueError, match="missing"):
            math_verify([""], ["\\boxed{None}"], [missing])


def test_responses_must_be_strings_and_the_answers_a_column():
    with pytest.raises(TypeError, match="response 1 is NoneType"):
        gsm8k_strict(["", ""], ["#### 1", None], ["1", "1"])
    with pytest.raises(TypeError, match="one string"):
        gsm8k_strict(["", ""], ["#### 1", "#### 2"], "12")  # would grade character by character
