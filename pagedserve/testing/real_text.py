"""Real English for quality checks on a trained model (tests and benchmarks/smollm2_gpu.py).

PROMPTS: 16 prompts of mixed kinds and lengths (a few words to a few hundred tokens).
PARAGRAPH: one fixed paragraph for prompt-logprob / perplexity checks.
TECHNICAL_TEXT: several paragraphs of technical prose (written for this project) for
teacher-forced top-1 agreement over a few thousand positions.
"""

from __future__ import annotations

__all__ = ["PROMPTS", "PARAGRAPH", "TECHNICAL_TEXT", "FRANCE_QUESTION"]

FRANCE_QUESTION = "What is the capital of France?"

PARAGRAPH = (
    "The river flows slowly through the old town, past the market square and under three stone "
    "bridges. In the morning, merchants open their shops and the smell of fresh bread fills the "
    "narrow streets. Children walk to school along the water, and in the evening the lamps are lit "
    "one by one as the bells of the church ring across the valley."
)

TECHNICAL_TEXT = """\
An inference server spends most of its life waiting on memory. During decoding, every new token \
requires reading all of the model's weights once, and for a small batch the arithmetic finishes \
long before the next bytes arrive from memory. This is why the speed of batch-one generation is \
usually quoted against the memory bandwidth of the device rather than its peak floating point rate. \
A model with one billion parameters stored in sixteen-bit precision occupies two gigabytes, and a \
device that moves three terabytes per second can therefore produce at most about fifteen hundred \
tokens per second for a single sequence, no matter how clever the kernels are.

The key and value cache changes the picture as sequences grow. Each layer keeps the keys and values \
of every past token so that attention does not have to recompute them, and this cache grows linearly \
with the length of the conversation. When many requests run at once, the cache, not the weights, \
becomes the largest consumer of memory. Early systems reserved a contiguous region for the longest \
possible sequence of every request, which wasted most of the space on requests that finished early. \
Paged attention borrows an idea from operating systems: the cache is cut into fixed-size blocks, and \
a table maps the logical positions of each sequence to physical blocks scattered anywhere in memory.

With paging, a scheduler can admit new requests as soon as a few blocks are free, and it can share \
blocks between requests that begin with the same prompt. A chat service often sends the same system \
message in front of every conversation, so the blocks holding that prefix can be computed once and \
referenced many times. Each block carries a reference count, and a block whose count drops to zero is \
not erased at once; it stays in a free list ordered by last use, so that a later request with the same \
prefix can still find it. Only when memory runs short is the least recently used block reclaimed.

Continuous batching is the other half of the design. Instead of waiting for a whole batch of requests \
to finish before starting the next, the scheduler decides at every step which sequences run. A long \
prompt can be split into chunks so that it does not stall the requests that are already generating, \
and a request that cannot get memory can be paused and resumed later, either by recomputing its cache \
from the tokens it has or by copying its blocks to host memory and back. The engine therefore runs a \
simple loop: plan a step, execute the model on the planned tokens, and update every request with the \
tokens it produced.

Numerical precision deserves care when results are compared across implementations. Two programs that \
compute the same network in sixteen-bit arithmetic will rarely agree on every logit, because the order \
of additions inside a matrix product changes the rounding. When the two most likely tokens are nearly \
tied, such a difference decides which one is chosen, and from that point the generated texts diverge. \
For this reason a fair comparison uses teacher forcing: both programs are fed the same reference text, \
and at every position one checks whether they agree on the most likely next token. Positions where the \
reference model is confident, with a clear margin between the first and second choice, should almost \
always agree; disagreements there point to a real bug rather than to rounding.

Quantized checkpoints add another layer. A file that stores weights in four bits with a scale and an \
offset for every block of thirty-two values is a quarter of the size of its sixteen-bit original, which \
makes it practical to ship a small model inside an ordinary software package. Before such weights can \
be used by kernels written for floating point, they are expanded back to floating point at load time. \
The expansion is exact with respect to the stored values, so a server that dequantizes the file and a \
reference library that does the same should produce the same network, and, in thirty-two-bit \
arithmetic, the same tokens.

Finally, a service must stay observable. Operators need to know how many requests are waiting, how \
full the cache is, how often prefixes are reused, and how long the first token takes to arrive. These \
numbers are exported in a standard text format that monitoring systems scrape every few seconds, and \
alerts fire when the waiting queue grows faster than the service can drain it. A well designed server \
sheds load early, answering with a clear error instead of letting every request slow down together, so \
that clients can retry elsewhere while the system recovers.
"""

PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Hello",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "Once upon a time, in a small village near the mountains, there lived",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "Photosynthesis is the process by which",
    "In 1969, the first humans to walk on the Moon were",
    "Here is a short list of healthy breakfast foods:\n1.",
    "Translate to French: Good morning, how are you?\nFrench:",
    PARAGRAPH + " The next morning,",
    "Question: Why is the sky blue?\nAnswer:",
    TECHNICAL_TEXT.split("\n\n")[0] + "\n\nIn summary,",
    TECHNICAL_TEXT.split("\n\n")[1] + " " + TECHNICAL_TEXT.split("\n\n")[2] + "\n\nThe main idea is that",
)
