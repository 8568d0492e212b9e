#pragma once
/// \file
/// mmbalance's data-parallel training on LibTorch's c10d: the umbrella header of the
/// `mmbalance::distributed` target (which defines `USE_C10D_GLOO` for c10d's headers).

#include "mmbalance/distributed/collective.h"
#include "mmbalance/distributed/data_parallel.h"
#include "mmbalance/distributed/process_group.h"
#include "mmbalance/mmbalance.h"
