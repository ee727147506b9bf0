"""The bundled sample prompts (`assets/sample_prompts.parquet`), written by this project.

`write_sample_prompts` regenerates the file deterministically: openings x subjects, 1,200 rows.
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
