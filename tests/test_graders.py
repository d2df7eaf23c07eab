"""Graders on realistic completions: numbers, MATH LaTeX, QA, multiple choice, generic."""

from __future__ import annotations

import doctest

import pytest

from memgen_cli.data import base, extraction, graders
from memgen_cli.data.extraction import (
    extract_boxed,
    extract_choice_letter,
    extract_final_answer,
    extract_hash_answer,
    extract_last_number,
    extract_math_answer,
)
from memgen_cli.data.graders import (
    GRADERS,
    math_accuracy_reward,
    math_equal,
    normalize_latex_answer,
    normalize_number,
    normalize_qa,
    numeric_equal,
    qa_exact_match,
)

# --------------------------------------------------------------------------- GSM-style numbers

GSM_CASES = [
    (
        "Janet has 16 - 3 - 4 = 9 eggs left.\nShe earns 9 * 2 = 18.\nThe answer is \\boxed{18}.",
        "18",
        1,
    ),
    ("So she makes \\boxed{\\$18} every day at the market.", "18", 1),
    ("Total = 1,250 + 250 = 1,500 dollars.\n#### 1500", "1500", 1),
    ("He needs three quarters of a cup, i.e. \\boxed{\\frac{3}{4}}.", "0.75", 1),
    ("Therefore the total is \\boxed{18.00}.", "18", 1),
    ("At night the temperature drops to \\boxed{-5} degrees.", "-5", 1),
    ("The temperature is \\boxed{5} degrees.", "-5", 0),
    ("First she picks \\boxed{12} apples, then 2 more, so \\boxed{14}.", "14", 1),
    ("First she picks \\boxed{12} apples, then 2 more, so \\boxed{14}.", "12", 0),
    ("So the answer is \\boxed{42}.\n\nFinal Answer: \\boxed{42}", "42", 1),
    ("I'm not sure how to solve this problem.", "7", 0),
    ("", "7", 0),
    ("So in total she spends 35 dollars.", "35", 1),
    ("She spent 20% of her savings, i.e. \\boxed{20\\%}", "20", 1),
    ("Each ticket costs \\boxed{20 \\text{ dollars}}.", "20", 1),
    ("The population is \\boxed{1,000,000}.", "1000000", 1),
    ("Adding up: 5 + 7 = 12, therefore the answer is \\boxed{12", "12", 1),
    ("The trip takes 7.5 hours.", "7.5", 1),
    ("x = 4, so y = 2x = 8.\n\\boxed{y = 8}", "8", 1),
    ("The number of marbles is \\fbox{27}.", "27", 1),
    ("So each friend gets \\boxed{\\dfrac{5}{2}} pizzas.", "2.5", 1),
    ("The answer is \\boxed{2.5}", "5/2", 1),
    ("48 / 2 = 24\n24 + 48 = 72\n#### 72", "72", 1),
    ("Natalia sold 48/2 = 24 clips in May, so 48+24 = 72 clips altogether.", "72", 1),
    ("His balance is \u221212 dollars.", "-12", 1),
    ("The answer is 18. Check: 3 + 4 = 7", "18", 0),
    ("\\boxed{\\boxed{9}}", "9", 1),
    ("So the price is $\\boxed{0.5}$ dollars.", "0.5", 1),
    ("Hence \\boxed{12}.", "13", 0),
    ("The answer is: **45**", "45", 1),
    ("We get \\boxed{3.14159}.", "3.14", 0),
    ("\\boxed{\\text{18}}", "18", 1),
    ("so the final answer is \\boxed{ 56 }.", "56", 1),
    ("She has 2 hours and 30 minutes left: \\boxed{150} minutes.", "150", 1),
    ("Final answer: -$3.50", "-3.5", 1),
    ("So \\boxed{1,000}", "1000", 1),
    ("Adding them: 40 + 2 = 42", "Work.\n#### 42", 1),
    ("no idea", "3", 0),
    ("It costs $3.50.", "3.5", 1),
    ("\\boxed{7} and later I mention 8", "7", 1),
    ("It is -3 degrees", "-3", 1),
    ("Result: 2/3", "0.6666667", 1),
    ("\\boxed{18} dollars. Check: 18*1 = 18", "18", 1),
]


@pytest.mark.parametrize("completion,gold,expected", GSM_CASES)
def test_gsm_numeric_grading(completion, gold, expected):
    assert GRADERS["numeric"](completion, gold) == expected


def test_last_box_by_default_first_on_request():
    text = "Intermediate: \\boxed{12}. Correcting the mistake, the answer is \\boxed{14}."
    assert extract_math_answer(text) == "14"
    assert extract_math_answer(text, which="first") == "12"  # the official MemGen choice


@pytest.mark.parametrize(
    "text,which,expected",
    [
        ("\\boxed{\\frac{1}{2}}", "last", "\\frac{1}{2}"),
        ("a \\boxed{1} b \\boxed{2}", "first", "1"),
        ("a \\boxed{1} b \\boxed{2}", "last", "2"),
        ("\\fbox{x^{2}}", "last", "x^{2}"),
        ("\\boxed{\\left\\{ 1, 2 \\right\\}}", "last", "\\left\\{ 1, 2 \\right\\}"),
        ("\\boxed 5", "last", "5"),
        ("\\boxed{}", "last", ""),
        ("no box here", "last", None),
        ("\\boxed{unclosed", "last", None),
        ("\\boxedfoo{3}", "last", None),
    ],
)
def test_extract_boxed(text, which, expected):
    assert extract_boxed(text, which) == expected


def test_extract_boxed_rejects_bad_which():
    with pytest.raises(ValueError):
        extract_boxed("\\boxed{1}", which="middle")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("She pays $1,250 in total.", "1,250"),
        ("10-5=5", "5"),
        ("so x=-5", "-5"),
        ("items 1,2,3", "3"),
        ("Half is 1/2", "1/2"),
        ("It costs .75 dollars.", ".75"),
        ("The answer is 18.", "18"),
        ("no numbers", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_extract_hash_answer():
    assert extract_hash_answer("work\n#### 1,000\n") == "1,000"
    assert extract_hash_answer("#### 3 #### 4") == "4"
    assert extract_hash_answer("no marker") is None


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("18", "18"),
        ("18.0", "18"),
        ("18.", "18"),
        ("$1,234.50", "1234.5"),
        ("\\$5", "5"),
        ("75%", "75"),
        ("18 dollars", "18"),
        ("12 \\text{ apples}", "12"),
        ("-3", "-3"),
        ("\u22123", "-3"),
        ("3/4", "0.75"),
        ("-3/4", "-0.75"),
        ("\\frac{3}{4}", "0.75"),
        ("\\dfrac{-3}{4}", "-0.75"),
        ("-\\frac34", "-0.75"),
        ("x = 7", "7"),
        ("Answer: 7", "7"),
        ("2x", None),
        ("5 hours and 30 minutes", None),
        ("3/0", None),
        ("n/a", None),
        ("", None),
    ],
)
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_numeric_equal_tolerance():
    assert numeric_equal("0.3333333333", "1/3")
    assert not numeric_equal("0.333", "1/3")
    assert numeric_equal(0, "0.0")
    assert not numeric_equal(None, "1")


# --------------------------------------------------------------------------- MATH LaTeX

MATH_CASES = [
    ("Thus $p = \\boxed{\\frac{1}{2}}$.", "\\frac12", 1),
    ("The probability is \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}", 1),
    ("The probability is \\boxed{0.5}.", "\\frac{1}{2}", 1),
    (
        "In polar form: \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        1,
    ),
    ("In polar form: \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})", 1),
    ("The angle measures \\boxed{90^\\circ}.", "90", 1),
    ("The side is \\boxed{10\\text{ inches}}.", "10", 1),
    ("Solving gives \\boxed{x = 5}.", "5", 1),
    ("So the length is \\boxed{\\sqrt3}.", "\\sqrt{3}", 1),
    ("So the length is \\boxed{2\\sqrt{3}}.", "\\sqrt{3}", 0),
    ("The winner is \\boxed{\\text{Devon}}.", "\\text{Devon}", 1),
    ("The ratio is \\boxed{3/4}.", "\\frac{3}{4}", 1),
    ("It costs \\boxed{\\$1.50}.", "\\$1.50", 1),
    ("The sum is \\boxed{18.0}.", "18", 1),
    ("The slope is \\boxed{-\\frac{2}{3}}.", "-\\frac23", 1),
    ("The slope is \\boxed{\\frac{-2}{3}}.", "-\\frac{2}{3}", 1),
    ("The coefficient is \\boxed{2x}.", "2", 0),
    ("Expanding: \\boxed{x^2+2x+1}", "x^2 + 2x + 1", 1),
    ("The solution set is \\boxed{(-\\infty, 3]}.", "(-\\infty,3]", 1),
    ("The correct option is \\boxed{\\text{(C)}}.", "\\text{(C)}", 1),
    ("The rate is \\boxed{5\\%}.", "5", 1),
    ("There are \\boxed{1,\\!000} ways.", "1000", 1),
    (
        "The vector is \\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}.",
        "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
        1,
    ),
    ("So $\\sin 60^\\circ = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt3}{2}", 1),
    ("Try \\boxed{4}. No wait, recount: \\boxed{6}.", "6", 1),
    ("The answer is 12", "12", 1),
    ("\\boxed{12}", "13", 0),
    ("I could not determine the value.", "7", 0),
    ("So $x = \\boxed{.5}$", "\\frac{1}{2}", 1),
    ("The ratio is \\boxed{\\tfrac{3}{2}}.", "1.5", 1),
    ("The period is \\boxed{ \\pi }.", "\\pi", 1),
    ("The roots are \\boxed{\\left\\{ 1, 2 \\right\\}}.", "\\{1,2\\}", 1),
    ("Hence the answer is $\\boxed 5$.", "5", 1),
    ("The area is \\boxed{6\\text{ cm}^2}.", "6", 1),
    ("Therefore $f(x) = \\boxed{3x - 1}$.", "3x-1", 1),
]


@pytest.mark.parametrize("completion,gold,expected", MATH_CASES)
def test_math_grading(completion, gold, expected):
    assert math_equal(extract_math_answer(completion), gold) == bool(expected)


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("\\left( \\dfrac12, 3 \\right)", "(\\frac{1}{2},3)"),
        ("10\\text{ cm}", "10"),
        ("\\text{Devon}", "Devon"),
        ("x = 5", "5"),
        ("f(x) = 2x", "f(x)=2x"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("18.0", "18"),
        ("3/4", "\\frac{3}{4}"),
        (".5", "0.5"),
        ("1,000", "1000"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("\\frac1{72}", "\\frac{1}{72}"),
        ("\\frac{1}2", "\\frac{1}{2}"),
        ("2.", "2"),
        (None, ""),
    ],
)
def test_normalize_latex_answer(raw, expected):
    assert normalize_latex_answer(raw) == expected


def test_math_equal_none():
    assert not math_equal(None, "1")
    assert not math_equal("", "")


# --------------------------------------------------------------------------- QA exact match

QA_CASES = [
    ("The answer is Paris.", ["Paris"], 1),
    ("Easy one: \\boxed{The Beatles}", ["Beatles", "The Beatles"], 1),
    ("Answer: the beatles", ["The Beatles"], 1),
    (
        "I believe it was Napoleon Bonaparte.\nAnswer: Napoleon",
        ["Napoleon Bonaparte", "Napoleon"],
        1,
    ),
    ("The capital of Australia is Canberra.", ["Canberra"], 0),
    ("Thinking about tall mountains...\n**Mount Everest**", ["Mount Everest", "Everest"], 1),
    ("The answer is: J. K. Rowling", ["J.K. Rowling", "J. K. Rowling"], 1),
    ("Apollo 11 landed in July.\nAnswer: 1969", ["1969"], 1),
    ("Answer: Abraham Lincoln", ["Lincoln"], 0),
    ("The answer is an apple.", ["Apple"], 1),
    ("The answer is THE NILE", ["Nile", "River Nile"], 1),
    ("", ["Mercury"], 0),
    ("I don't know.", ["Mercury"], 0),
    ("The answer is Mercury.", ["mercury"], 1),
    ("\\boxed{\\text{Leonardo da Vinci}}", ["Leonardo da Vinci"], 1),
    ("Final answer: Leonardo", ["Leonardo da Vinci"], 0),
    ("It's Tokyo", ["Tokyo"], 0),
    ("The largest city in Japan\nby population is\nTokyo", ["Tokyo"], 1),
    ("The answer is Washington, D.C.", ["Washington, D.C.", "Washington DC"], 1),
    ("The answer is 'Jupiter'", ["Jupiter"], 1),
    ("The answer is Jupiter, the largest planet.", ["Jupiter"], 0),
    ("Answer: Sir Isaac Newton", ["Isaac Newton", "Sir Isaac Newton"], 1),
    ("Answer: Newton.", ["Isaac Newton"], 0),
    ("The answer is: Pacific Ocean", ["Pacific", "Pacific Ocean"], 1),
    ("The chemical symbol: \\boxed{Au}", ["Au", "Gold"], 1),
    ("The answer is gold", ["Au", "Gold"], 1),
    ("Thinking...\n\nBrazil", ["Brazil"], 1),
    ("The answer is Brasil", ["Brazil"], 0),
    ("ANSWER: Charles Dickens", ["Charles Dickens"], 1),
    ("The answer is William Shakespeare", ["Shakespeare", "William Shakespeare"], 1),
    ("The answer is the Pacific.", ["Pacific Ocean"], 0),
    ("The answer is \u201cHamlet\u201d.", ["Hamlet"], 1),
]


@pytest.mark.parametrize("completion,aliases,expected", QA_CASES)
def test_qa_exact_match(completion, aliases, expected):
    assert qa_exact_match(extract_final_answer(completion), aliases) == bool(expected)


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("The Beatles", "beatles"),
        ("  An  Apple! ", "apple"),
        ("Washington, D.C.", "washington dc"),
        ("the theme", "theme"),
        ("", ""),
    ],
)
def test_normalize_qa(raw, expected):
    assert normalize_qa(raw) == expected


def test_qa_exact_match_single_string_and_none():
    assert qa_exact_match("paris", "Paris")
    assert not qa_exact_match(None, ["Paris"])
    assert not qa_exact_match("the", ["a"])  # both normalise to nothing


# --------------------------------------------------------------------------- multiple choice

CHOICE_CASES = [
    ("The answer is (B).", "B"),
    ("Answer: C", "C"),
    ("\\boxed{D}", "D"),
    ("The answer is \\boxed{(A)}", "A"),
    ("\\boxed{\\text{B}}", "B"),
    ("After comparing the options, I choose option C.", "C"),
    ("The correct answer is **A**", "A"),
    ("A) 5 eV\nB) 10 eV\nC) 15 eV\nD) 20 eV\nThe answer is B", "B"),
    ("B", "B"),
    ("(C)", "C"),
    ("I think it's between (A) and (C), and (C) is more plausible.", "C"),
    ("None of the options seem right.", None),
    ("", None),
    ("The answer is (E).", None),
    ("Answer: (B) 3.2 x 10^5 m/s", "B"),
    ("The final answer is $\\boxed{C}$", "C"),
    ("Final Answer: D.", "D"),
    ("The answer is A because the entropy increases.", "A"),
    ("Initially the answer is A. But on reflection the answer is D.", "D"),
    ("The correct choice is (B)", "B"),
    ("**Answer: C**", "C"),
    ("So, the answer must be C.", "C"),
    ("The answer is C) 4", "C"),
    ("A", "A"),
    ("Answer:\n\n(D)", "D"),
    ("\\boxed{B}\n\nExplanation: option A is wrong because it ignores spin.", "B"),
    ("Therefore, option (A) is correct.", "A"),
    ("The answer is B, since energy is conserved.", "B"),
    ("I'd go with choice D", "D"),
    ("Answer: \\boxed{A}", "A"),
    ("The answer is a mixture of products.", None),
    ("Both (B) and (D) are plausible, but the answer is D", "D"),
]


@pytest.mark.parametrize("completion,expected", CHOICE_CASES)
def test_extract_choice_letter(completion, expected):
    assert extract_choice_letter(completion) == expected


# --------------------------------------------------------------------------- generic graders

GENERIC_CASES = [
    ("exact", "The answer is blue.", "blue", 1),
    ("exact", "The answer is Blue", "blue", 1),
    ("exact", "\\boxed{yes}", "Yes", 1),
    ("exact", "Answer: no", "yes", 0),
    ("exact", "Sorting them:\nred, green, blue", "red, green, blue", 1),
    ("exact", "reasoning...\nFinal answer: 42", "42", 1),
    ("exact", "", "x", 0),
    ("exact", "The answer is 42.0", "42", 0),
    ("exact", "**Answer:** Tuesday", "Tuesday", 1),
    ("exact", "Answer: Tuesday\nAnswer: Wednesday", "Wednesday", 1),
    ("boxed", "\\boxed{\\frac{1}{2}}", "0.5", 1),
    ("boxed", "The answer is 0.5", "0.5", 0),
    ("boxed", "\\boxed{x=3}", "3", 1),
    ("boxed", "\\boxed{4} then \\boxed{5}", "5", 1),
    ("boxed", "\\fbox{12}", "12", 1),
    ("boxed", "\\boxed{12", "12", 0),
    ("boxed", "$\\boxed{-7}$", "-7", 1),
    ("contains", "I think the capital is Paris, France.", "Paris", 1),
    ("contains", "Parisian food is great", "Paris", 0),
    ("contains", "THE EIFFEL TOWER is tall", "Eiffel Tower", 1),
    ("contains", "nothing relevant", "Paris", 0),
    ("contains", "anything", "", 0),
    ("contains", "The answer: New York City.", "new york", 1),
    ("contains", "Answer: 42", "42", 1),
]


@pytest.mark.parametrize("grader,completion,gold,expected", GENERIC_CASES)
def test_generic_graders(grader, completion, gold, expected):
    assert GRADERS[grader](completion, gold) == expected


# --------------------------------------------------------------------------- rewards, doctests


def test_math_accuracy_reward_trl_form():
    completions = ["\\boxed{18}", "The answer is 17", [{"role": "assistant", "content": "#### 5"}]]
    rewards = math_accuracy_reward(
        completions, answer=["18", "18", "Some work\n#### 5"], prompts=[]
    )
    assert rewards == [1.0, 0.0, 1.0]


def test_math_accuracy_reward_length_mismatch():
    with pytest.raises(ValueError):
        math_accuracy_reward(["1"], answer=["1", "2"])


def test_equation_steps_reward_scores_each_written_step():
    completions = [
        "23 + 45 = 68\n68 - 12 = 56\nThe answer is \\boxed{56}.",  # both steps right
        "23 + 45 = 68\n68 - 12 = 46\nThe answer is \\boxed{46}.",  # the second wrong
        "8 / 0 = 0 and 2 * 3 * 4 = 24",  # no value for 8 / 0; precedence as written
        "x = 3, 10 = 10, 1.5 + 1.5 = 3.0",  # 'x' and a bare number are not steps
        "The answer is 56.",  # no steps at all
    ]
    assert graders.equation_steps_reward(completions, answer=["56"] * 5) == [
        1.0,
        0.5,
        0.5,
        1.0,
        0.0,
    ]
    assert graders.equation_steps_reward(["2 + 3 * 4 = 14"]) == [1.0]


def test_chain_steps_reward_follows_the_chain_left_to_right():
    q = "Calculate 62 - 66 + 47 - 5."
    completions = [
        "62 - 66 = -4\n-4 + 47 = 43\n43 - 5 = 38\nThe answer is \\boxed{38}.",  # all three
        "62 - 66 = -4\n-4 + 47 = 41\n41 - 5 = 36",  # a wrong sum is still a step taken
        "62 - 66 = -4\n4 + 47 = 51\n51 - 5 = 46",  # carries the wrong operand: 1 of 3
        "62 - 66 = -4\n-4 - 47 = -51",  # the wrong operator
        "62 - 66 + 47 - 5 = 38",  # no step: the whole chain at once
        "66 - 62 = 4",  # not the chain's first operation
        [{"role": "assistant", "content": "62-66=-4, -4+47=43"}],  # TRL's conversational form
    ]
    got = graders.chain_steps_reward(completions, question=[q] * len(completions))
    assert got == [1.0, 1.0, 1 / 3, 1 / 3, 0.0, 0.0, 2 / 3]
    assert graders.chain_steps_reward(["1 + 2 = 3"], question=["What is one plus two?"]) == [None]
    # a decimal chain; extra steps after the last operation are ignored
    assert graders.chain_steps_reward(
        ["1.5 + 2 = 3.5\n3.5 + 3.5 = 7"], question=["Calculate 1.5 + 2."]
    ) == [1.0]


@pytest.mark.parametrize("module", [graders, extraction, base])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
