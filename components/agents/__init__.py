"""Agents: text environments with Gymnasium's reset/step semantics, the tools an agent calls
(calculator, a sandboxed Python, search), its working, episodic and semantic memory, the
ReAct decision loop with Reflexion's trials, and the token-in/token-out trajectories that
agentic RL trains on (after CoALA, Sumers et al. 2023)."""
