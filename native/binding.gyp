{
  # native/build.mjs passes with_cuda, cuda_home and cuda_objs (objects nvcc compiled).
  'variables': {
    'with_cuda%': 0,
    'cuda_home%': '/usr/local/cuda',
    'cuda_objs%': '',
  },
  'targets': [{
    'target_name': 'ep_actors_native',
    'sources': [
      'src/addon.cc',
      'src/gemm.cc',
      'src/experts.cc',
      'src/blas.cc',
      'src/nccl.cc',
    ],
    'include_dirs': ["<!(node -p \"require('node-addon-api').include_dir\")", 'src', 'cuda'],
    'defines': ['NAPI_VERSION=8', 'NODE_ADDON_API_DISABLE_DEPRECATED', 'NAPI_CPP_EXCEPTIONS'],
    'cflags!': ['-fno-exceptions'],
    'cflags_cc!': ['-fno-exceptions', '-std=gnu++17', '-std=gnu++20'],
    # No -march=native: what ships must run on any x86-64; AVX2 paths dispatch at run time.
    'cflags_cc': ['-std=c++17', '-O3', '-fexceptions', '-fno-math-errno', '-Wall', '-Wno-unused-parameter'],
    'libraries': ['-ldl', '-lpthread'],
    'conditions': [
      ['with_cuda==1', {
        'sources': ['src/cuda_backend.cc'],
        'defines': ['EP_WITH_CUDA=1'],
        'include_dirs': ['<(cuda_home)/include'],
        # Static cudart: the .node loads on machines without a GPU or a CUDA install.
        'libraries': ['<@(cuda_objs)', '<(cuda_home)/lib64/libcudart_static.a', '-lrt'],
      }, {
        'sources': ['src/cuda_stub.cc'],
      }],
    ],
  }],
}
