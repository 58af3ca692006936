{
  "targets": [
    {
      "target_name": "vcpud_native",
      "sources": ["native/addon.cc", "native/kvm_abi.c", "native/errors.cc", "native/kvm_ioctls.cc", "native/guest_memory.cc", "native/guest_memory_populate.cc", "native/crc32c.cc", "native/vcpu_runner.cc", "native/dirty_log.cc", "native/page_frames.cc", "native/memory_guard.cc", "native/fs_at.cc", "native/file_crc.cc", "native/missing_page_fill.cc", "native/wire_program.cc", "native/socket_options.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "dependencies": ["<!(node -p \"require('node-addon-api').targets\"):node_addon_api_except"],
      "defines": ["NAPI_VERSION=8"],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++1y", "-std=gnu++17"],
      "libraries": ["-lpthread"]
    }
  ]
}
