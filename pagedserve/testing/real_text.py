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

Deploying a new version of a model is a risk that teams manage in steps. A small share of the \
traffic is first sent to the new servers, and their error rate and latency are compared with those \
of the servers already in service. If the new version answers more slowly or fails more often, the \
router takes the traffic away again without waiting for a person to notice. Only when the canary has \
served enough requests without trouble does its share grow, until the old servers can be retired. \
The same idea applies to configuration: a change that cannot be tested on a small share first is a \
change that can break everything at once.

Tokenizers are an easily overlooked source of differences between systems. A model is trained on \
sequences of integer identifiers, not on characters, and the mapping from text to identifiers must \
be exactly the one used during training. Byte pair encoding starts from single bytes and repeatedly \
merges the most frequent adjacent pair into a new symbol, so the vocabulary contains whole common \
words, frequent fragments of rare words, and every single byte as a last resort. Two tokenizers that \
disagree on a single merge rule will split some words differently, and the model will then see \
inputs it was never trained on, which quietly lowers the quality of its answers.

Sampling turns the probabilities computed by the model into text. Greedy decoding always takes the \
most likely token, which is reproducible but tends to repeat itself. Temperature divides the logits \
before the softmax, so that a value below one sharpens the distribution and a value above one \
flattens it. Nucleus sampling keeps only the smallest set of tokens whose probabilities add up to a \
chosen threshold and draws from that set. A seed makes the draws repeatable, which matters when a \
user wants to reproduce a result or when a test must compare two runs token by token.

Memory on the accelerator is divided between the weights, the activations of the current step, and \
the cache. At start-up the engine runs the model once on the largest batch it will ever schedule, \
measures the peak memory that pass needed, and gives what remains, up to a configured fraction of \
the device, to the cache. Asking for too much leaves no room for the activations of a large step and \
the server fails under load; asking for too little wastes capacity and forces requests to wait. \
Profiling at start-up replaces guesswork with a measurement taken on the machine that will serve.

Small models have a place beside large ones. A model with a hundred million parameters fits in the \
cache of a laptop processor, answers simple questions in a fraction of a second, and can run where \
no accelerator is available at all. It will not write a long essay or solve a hard puzzle, but it can \
classify requests, extract names and dates, suggest completions, or check that a serving system works \
end to end before a larger model is deployed on it. For developers, a small model that installs in a \
minute is the difference between trying a system today and postponing it until a large download ends.

Benchmarks deserve as much care as the systems they measure. A number without the command that \
produced it, the commit it ran at, and the machine it ran on cannot be reproduced, and a number that \
cannot be reproduced cannot be trusted. Good reports state the workload, the warm-up, and the spread \
between repeated runs, and they put each figure beside a floor or a peer so that a reader can judge \
whether it is good. The most useful benchmark is often the one that explains where the time goes, \
because it tells the next engineer which part of the system to improve.
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
