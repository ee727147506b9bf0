"""Sample inputs written by this project: text prompts (`assets/sample_prompts.parquet`) and chat requests.

`write_sample_prompts` regenerates the Parquet file deterministically: openings x subjects, 1,200 rows.
`CHAT_SAMPLES` are 64 chat requests of three kinds for instruct models (the demo and the benchmarks): questions
with a known short answer, instructions, and rewrites.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_PROMPTS = Path(__file__).parent / "assets" / "sample_prompts.parquet"

OPENINGS = [
    "The {s} is",
    "In Python, the {s}",
    "A short note on the {s}:",
    "When you use the {s}, remember that",
    "The documentation says the {s}",
    "Here is how the {s} works:",
    "Unlike other languages, the {s}",
    "Every programmer should know that the {s}",
    "The main reason for the {s} is",
    "An example of the {s}:",
    "Most people misunderstand the {s} because",
    "To debug the {s}, first",
    "The history of the {s} began when",
    "One subtle detail of the {s} is that",
    "A beginner's guide to the {s}:",
    "The {s} was designed so that",
    "If the {s} fails,",
    "Compared with a loop, the {s}",
    "The fastest way to use the {s} is",
    "Before changing the {s}, check that",
    "A common mistake with the {s} is",
    "The {s} returns",
    "Under the hood, the {s}",
    "The best part of the {s} is",
    "Why does the {s} exist? Because",
]
SUBJECTS = [
    "for statement",
    "while loop",
    "with statement",
    "import system",
    "garbage collector",
    "exception handler",
    "class definition",
    "function call",
    "list comprehension",
    "dictionary",
    "string method",
    "integer type",
    "floating point number",
    "generator",
    "decorator",
    "context manager",
    "module search path",
    "assignment expression",
    "lambda",
    "global statement",
    "operator precedence",
    "slice object",
    "iterator protocol",
    "boolean operation",
    "comparison chain",
    "tuple",
    "set type",
    "bytes object",
    "format string",
    "descriptor",
    "metaclass",
    "coroutine",
    "async for loop",
    "pass statement",
    "return statement",
    "yield expression",
    "assert statement",
    "del statement",
    "raise statement",
    "try statement",
    "name binding",
    "frame object",
    "code object",
    "traceback",
    "keyword argument",
    "default argument",
    "unpacking",
    "match statement",
]


# (question, accepted answers): a reply counts as correct when it contains one of them (case-insensitive).
QUESTIONS = [
    ("What is the capital of France?", ["paris"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("What is the capital of Italy?", ["rome"]),
    ("What is the capital of Germany?", ["berlin"]),
    ("What is the capital of Spain?", ["madrid"]),
    ("What is the capital of the United Kingdom?", ["london"]),
    ("How many days are in a week?", ["seven", "7"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("How many legs does a dog have?", ["four", "4"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What color is grass?", ["green"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("Which planet is known as the Red Planet?", ["mars"]),
    ("What is the chemical formula of water?", ["h2o", "h₂o"]),
    ("What is 2 + 2?", ["4", "four"]),
    ("What is 10 times 10?", ["100", "hundred"]),
    ("What gas do plants take in from the air?", ["carbon dioxide", "co2", "co₂"]),
    ("At what temperature in Celsius does water freeze?", ["0", "zero"]),
    ("At what temperature in Celsius does water boil?", ["100"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("What is the largest ocean on Earth?", ["pacific"]),
    ("What is the opposite of hot?", ["cold"]),
    ("How many continents are there?", ["seven", "7"]),
    ("Which animal is called the king of the jungle?", ["lion"]),
    ("What do bees make?", ["honey"]),
    ("What is the tallest animal in the world?", ["giraffe"]),
    ("Which star is at the center of our solar system?", ["sun"]),
    ("How many hours are in a day?", ["24", "twenty-four", "twenty four"]),
    ("What language is spoken in Brazil?", ["portuguese"]),
    ("What is the currency of the United States?", ["dollar"]),
    ("What is frozen water called?", ["ice"]),
    ("How many months are in a year?", ["twelve", "12"]),
]
INSTRUCTIONS = [
    "Write a haiku about the sea.",
    "Give three tips for staying healthy.",
    "Explain what a computer is to a child.",
    "Write a short poem about autumn.",
    "Suggest a name for a pet cat.",
    "List three fruits that are red.",
    "Describe a sunset in one sentence.",
    "Write a friendly greeting for a new neighbor.",
    "Give me a tip for learning to code.",
    "Explain why exercise is good for you.",
    "Write one sentence about the moon.",
    "Suggest a fun weekend activity.",
    "Describe how to make a cup of tea.",
    "Give two reasons to read books.",
    "Write a thank-you note to a teacher.",
    "Explain what rain is.",
]
REWRITES = [
    "Rewrite in formal English: gonna be late, sorry",
    "Rewrite this sentence in the past tense: I walk to school.",
    "Make this sentence more polite: Give me the salt.",
    "Rewrite with simpler words: The feline reposed upon the rug.",
    "Correct the grammar: She don't like apples.",
    "Rewrite as a question: The store is open.",
    "Summarize in a few words: The meeting moved from Monday to Wednesday because the manager was sick.",
    "Translate to French: Good morning.",
    "Rewrite in the plural: The cat sleeps.",
    "Make this sentence shorter: In my personal opinion, I think that the weather today is very nice.",
    "Rewrite positively: This movie was not bad.",
    "Fix the spelling: I recieved the pakage yesterday.",
    "Rewrite in the future tense: I eat lunch at noon.",
    "Turn this into a title: how to grow tomatoes at home",
    "Rewrite formally: hey, can u send me the file?",
    "Rewrite with simpler words: The weather is exceedingly inclement.",
]


def chat_samples() -> list[dict]:
    """The 64 chat requests: `{"id", "kind", "content", "answers"}` (`answers` empty unless kind is question)."""
    rows = [{"kind": "question", "content": q, "answers": a} for q, a in QUESTIONS]
    rows += [{"kind": "instruction", "content": t, "answers": []} for t in INSTRUCTIONS]
    rows += [{"kind": "rewrite", "content": t, "answers": []} for t in REWRITES]
    return [{"id": f"{r['kind']}-{i:02d}", **r} for i, r in enumerate(rows)]


def is_correct(text: str, answers: list[str]) -> bool:
    """Whether a reply contains one of the accepted answers (case-insensitive; digits as whole numbers)."""
    import re

    low = text.lower()
    return any(re.search(rf"(?<!\d){re.escape(a)}(?!\d)" if a.isdigit() else re.escape(a), low) for a in answers)


def sample_prompts() -> list[str]:
    """1,200 distinct English prompts: every opening with every subject."""
    return [o.format(s=s) for s in SUBJECTS for o in OPENINGS]


def write_sample_prompts(path: Path = SAMPLE_PROMPTS) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = sample_prompts()
    table = pa.table(
        {
            "id": [f"sample-{i:05d}" for i in range(len(prompts))],
            "prompt": prompts,
            "topic": [p.split(" ")[-1] for p in prompts],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


if __name__ == "__main__":
    print(write_sample_prompts())
