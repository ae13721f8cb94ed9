#include "addon.h"
namespace ep {
void initNccl(Napi::Env env, Napi::Object exports, EpAddon& addon) {}
}
