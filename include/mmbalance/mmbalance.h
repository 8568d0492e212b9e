#pragma once
/// \file
/// mmbalance: balanced multi-modal learning on LibTorch. The umbrella header.

#include "mmbalance/balancing/agm.h"
#include "mmbalance/balancing/balancer.h"
#include "mmbalance/balancing/balancer_options.h"
#include "mmbalance/balancing/epoch_features.h"
#include "mmbalance/balancing/epoch_losses.h"
#include "mmbalance/balancing/gradient_blending.h"
#include "mmbalance/balancing/gradient_modulation.h"
#include "mmbalance/balancing/guided.h"
#include "mmbalance/balancing/loss_weighting.h"
#include "mmbalance/balancing/masked_outputs.h"
#include "mmbalance/balancing/mmpareto.h"
#include "mmbalance/balancing/ogm_ge.h"
#include "mmbalance/balancing/opm.h"
#include "mmbalance/balancing/pmr.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_transaction.h"
#include "mmbalance/balancing/random.h"
#include "mmbalance/balancing/reinitialization.h"
#include "mmbalance/balancing/relearning.h"
#include "mmbalance/balancing/sample_valuation.h"
#include "mmbalance/balancing/vanilla.h"
#include "mmbalance/branch/branch.h"
#include "mmbalance/branch/conv_branch.h"
#include "mmbalance/branch/resnet_branch.h"
#include "mmbalance/fusion/fusion_context.h"
#include "mmbalance/fusion/fusion_module.h"
#include "mmbalance/fusion/mmtm.h"
#include "mmbalance/fusion/running_mean.h"
#include "mmbalance/io/checkpoint.h"
#include "mmbalance/metrics/cluster_purity.h"
#include "mmbalance/metrics/head_losses.h"
#include "mmbalance/metrics/learning_speed_meter.h"
#include "mmbalance/metrics/sample_contributions.h"
#include "mmbalance/metrics/utilization_probe.h"
#include "mmbalance/model/loss.h"
#include "mmbalance/model/multimodal_net.h"
#include "mmbalance/model/step_kind.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// Common combinations.
using VanillaBalancer = Balancer<VanillaPolicy>;
using RandomBalancer = Balancer<RandomPolicy>;
using GuidedBalancer = Balancer<GuidedPolicy>;

/// The paper's Colored-and-gray MNIST shape: two `ConvBranch`es joined by `MMTM`s.
using ConvMMTMNet = MultiModalNet<ConvBranch, ConvBranch, MMTM>;

/// The paper's ModelNet40 shape: two `ResNetBranch`es joined by `MMTM`s.
using ResNetMMTMNet = MultiModalNet<ResNetBranch, ResNetBranch, MMTM>;

}  // namespace mmbalance
