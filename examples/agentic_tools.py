"""Tools and an environment for the agentic examples (examples/grpo_tools.yaml, examples/grpo_environment.yaml).

A tool is a plain function (sync or `async def`) with type hints and a Google-style docstring: posttrain turns it
into a JSON schema with transformers' `get_json_schema` and the chat template shows it to the model. An environment
is a class: one instance per rollout, `reset(**row)` may return text appended to the user's message, its public
methods are the rollout's tools and `get_reward()` scores the rollout.
"""


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with +, -, * and /.

    Args:
        expression: The expression, e.g. "7 + 5".
    """
    if not set(expression) <= set("0123456789+-*/(). "):
        raise ValueError("only numbers and + - * / ( ) are allowed")
    value = eval(expression, {"__builtins__": {}})  # noqa: S307 — characters checked above
    return str(int(value)) if float(value).is_integer() else str(value)


class ArithmeticEnv:
    """The arithmetic task as an environment: the model computes with `calculator` and commits with `answer`;
    the reward is 1 when the committed answer is the row's `answer`."""

    def reset(self, answer: str = "", **row) -> str | None:
        self.expected, self.given = str(answer), None
        return None  # nothing to add to the question

    def calculator(self, expression: str) -> str:
        """Evaluate an arithmetic expression with +, -, * and /.

        Args:
            expression: The expression, e.g. "7 + 5".
        """
        return calculator(expression)

    def answer(self, value: str) -> str:
        """Commit the final answer.

        Args:
            value: The answer, a number.
        """
        self.given = str(value).strip()
        return "recorded"

    def get_reward(self) -> float:
        return float(self.given == self.expected)
