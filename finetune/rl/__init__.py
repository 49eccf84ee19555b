"""PPO, written here because TRL no longer has a PPOTrainer: `functional` (the arithmetic as small pure
functions), `engine` (one frozen base with policy / value / reward adapters; rollout and update),
`scoring` (learned and rule-based rewards), `checkpoints`, `rewards` (rule rewards that ship)."""
