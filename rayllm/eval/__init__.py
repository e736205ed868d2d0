"""`rayllm eval`: perplexity, generation tasks and lm-eval-harness tasks over models, adapters,
registry versions and live endpoints, side by side. Light to import: each stage imports torch,
vLLM, Ray or lm-eval when it runs. `rayllm.eval.perplexity.perplexity` is the trainer-exact figure
the promotion gate compares a live endpoint against."""
