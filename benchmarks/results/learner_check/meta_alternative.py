"""Meta-training with another DQN config (``_policy_config`` replaced; PPO keeps the shipped
meta-training config):

* ``linear``: epsilon falls linearly over 60% of the expected decisions, one gradient step per
  decision, lr 1e-3, batch 32;
* ``pinned``: the meta-training config as it was before the DQN defaults changed (lr 1e-3,
  batch 32, one gradient step per decision, no Double DQN, the geometric epsilon decay).

    python benchmarks/results/learner_check/meta_alternative.py pinned --kind switching --choices sgd,sam \
        --algo dqn --episodes 100 --seed 0 --out alt.pt --no-progress --quiet
"""

import sys

import rlopt.meta.train_policy as tp
from rlopt.policies import DQNConfig, PPOConfig


def config(variant):
    def make(kind, algo, episodes, dist, seed):
        if algo == "ppo":
            return PPOConfig(hidden=32, rollout_len=16, update_epochs=4, ent_coef=0.01, minibatch_size=0)
        common = dict(
            hidden=32,
            gamma=0.9,
            lr=1e-3,
            batch_size=32,
            buffer_size=2000,
            learning_starts=16,
            train_frequency=1,
            target_update=20,
            double_dqn=False,
        )
        if variant == "linear":
            return DQNConfig(
                **common, exploration_decisions=max(1, int(0.6 * episodes * dist.mean_decisions(seed=seed)))
            )
        return DQNConfig(**common, epsilon_decay=tp._exploration_decay(episodes, dist.mean_decisions(seed=seed)))

    return make


if __name__ == "__main__":
    tp._policy_config = config(sys.argv[1])
    tp.main(sys.argv[2:])
