# NixOS module: services.ml-offload runs the API as ml-offload-api.service, user ml-offload,
# state in /var/lib/ml-offload, logs in the journal (journalctl -u ml-offload-api.service).
#
# Every setting reaches the server as its ML_OFFLOAD_<NAME> environment variable (the names
# in python/mloffload/config.py, OPTIONS); tests/test_deploy.py evaluates this file and
# feeds the resulting environment to the server's own configuration loader.
#
# contrib/systemd/ml-offload-api.service is the same unit for other distributions: keep the
# two in step (the test compares their [Service] settings).
{ config, lib, pkgs, ... }:

let
  cfg = config.services.ml-offload;
  inherit (lib) mkOption types;

  stateDir = "/var/lib/ml-offload";
  proxied = cfg.backend == "llama-server";
  loopback = cfg.host == "localhost" || cfg.host == "::1" || lib.hasPrefix "127." cfg.host;
  apiKeyFile = if cfg.apiKeyFile == null then null else toString cfg.apiKeyFile;
  upstreamKeyFile =
    if cfg.llamacppApiKeyFile == null then null else toString cfg.llamacppApiKeyFile;

  # Module option -> server setting. Values are strings, as the environment carries them.
  settingsEnvironment = {
    ML_OFFLOAD_HOST = cfg.host;
    ML_OFFLOAD_PORT = toString cfg.port;
    ML_OFFLOAD_DATA_DIR = stateDir;
    ML_OFFLOAD_MODELS_DIR = lib.concatMapStringsSep ":" toString cfg.modelsDir;
    ML_OFFLOAD_DEFAULT_MODEL = cfg.defaultModel;
    ML_OFFLOAD_N_GPU_LAYERS = toString cfg.nGpuLayers;
    ML_OFFLOAD_KEEP_ALIVE = toString cfg.keepAlive;
    ML_OFFLOAD_BACKEND = cfg.backend;
    ML_OFFLOAD_LLAMACPP_URL = cfg.llamacppUrl;
  } // lib.optionalAttrs (apiKeyFile != null) {
    # The key file is handed over with LoadCredential= (below), so it can stay root-only.
    ML_OFFLOAD_API_KEY_FILE = "%d/api-key";
  } // lib.optionalAttrs (cfg.llamaServerBin != null) {
    ML_OFFLOAD_LLAMA_SERVER_BIN = toString cfg.llamaServerBin;
  } // lib.optionalAttrs (upstreamKeyFile != null) {
    ML_OFFLOAD_LLAMACPP_API_KEY_FILE = "%d/llamacpp-api-key";
  };
in
{
  options.services.ml-offload = {
    enable = lib.mkEnableOption "the ml-offload OpenAI-compatible LLM API (ml-offload-api.service)";

    package = mkOption {
      type = types.package;
      default = pkgs.ml-offload or (pkgs.callPackage ./app.nix { });
      defaultText = lib.literalExpression "pkgs.ml-offload";
      description = ''
        The ml-offload server. The default is built from this nixpkgs, so llama.cpp is
        CUDA-enabled when `nixpkgs.config.cudaSupport = true`.
      '';
    };

    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = ''
        Address to bind. Any address but loopback needs `apiKeyFile` (the server refuses to
        serve a non-loopback address without a key unless
        `extraEnvironment.ML_OFFLOAD_ALLOW_UNAUTHENTICATED = "true"`).
      '';
    };

    port = mkOption {
      type = types.port;
      default = 9000;
      description = "TCP port of the API (ML_OFFLOAD_PORT).";
    };

    modelsDir = mkOption {
      type = types.coercedTo types.path lib.toList (types.listOf types.path);
      default = [ ];
      example = [ "/var/lib/llamacpp/models" ];
      description = ''
        Folders scanned for .gguf files. The service can read them (ProtectSystem=strict
        leaves the file system readable) but not folders under /home (ProtectHome).
      '';
    };

    defaultModel = mkOption {
      type = types.str;
      default = "";
      example = "/var/lib/llamacpp/models/L3-8B-Stheno-v3.2-Q4_K_S.gguf";
      description = ''
        Registry id, alias or .gguf path answered for model "default". Empty: the embedded
        Gemma 3 270M, assembled into /var/lib/ml-offload/models on first start.
      '';
    };

    nGpuLayers = mkOption {
      type = types.either (types.enum [ "auto" ]) types.int;
      default = "auto";
      example = 32;
      description = ''
        Layers offloaded to the GPU: "auto" fits as many as free VRAM allows, -1 offloads all.
      '';
    };

    keepAlive = mkOption {
      type = types.either types.str types.int;
      default = "5m";
      example = "1h";
      description = ''
        Unload an idle model after this long (30s, 5m, 1h, or seconds; negative: never), so
        VRAM returns to baseline.
      '';
    };

    apiKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/ml-offload-api-key";
      description = ''
        File holding the API key clients must send as `Authorization: Bearer KEY`. Give a
        path outside the Nix store (e.g. from agenix or sops-nix): it is passed to the
        service with LoadCredential=, so it may be readable by root only.
      '';
    };

    backend = mkOption {
      type = types.enum [ "auto" "managed" "llamacpp" "llama-server" ];
      default = "auto";
      description = ''
        `managed` runs each model in its own llama-server process (started, supervised and
        stopped by the service); `llamacpp` runs llama.cpp inside the service;
        `llama-server` proxies to an external llama-server at `llamacppUrl` and orders the
        service after `llamacppService`; `auto` is `managed` when a llama-server binary is
        at hand (`extraEnvironment.ML_OFFLOAD_LLAMA_SERVER_BIN`, or one on the service's
        PATH), else `llamacpp`.
      '';
    };

    llamaServerBin = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = lib.literalExpression ''"''${pkgs.llama-cpp}/bin/llama-server"'';
      description = ''
        The llama-server binary that managed mode runs each model with (with `backend =
        "auto"`, setting it selects managed mode). If it dies with SIGILL on an Intel CPU
        with AMX, build it with `-mno-amx-tile -mno-amx-int8 -mno-amx-bf16` in the C and C++
        flags (the README's "Runs on any x86-64 CPU" says why). With
        `backend = "llama-server"`, the service starts this binary itself on `llamacppUrl`'s
        port.
      '';
    };

    llamacppUrl = mkOption {
      type = types.str;
      default = "http://127.0.0.1:8080";
      description = "Base URL of llama-server when `backend` is `llama-server`.";
    };

    llamacppApiKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/llamacpp-api-key";
      description = ''
        File holding the key llama-server was started with (its `--api-key`), sent to it as
        `Authorization: Bearer KEY`. Like `apiKeyFile`, keep it outside the Nix store; it is
        passed with LoadCredential=.
      '';
    };

    llamacppService = mkOption {
      type = types.str;
      default = "llamacpp.service";
      example = "llama-cpp.service";
      description = ''
        The unit that runs llama-server, wanted and ordered before the API when `backend` is
        `llama-server`. nixpkgs' own `services.llama-cpp` names its unit llama-cpp.service.
      '';
    };

    extraEnvironment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        ML_OFFLOAD_N_CTX = "8192";
        ML_OFFLOAD_LOG_JSON = "true";
      };
      description = ''
        More server settings as ML_OFFLOAD_* variables (see `ml-offload-server --help`);
        they override the options above.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open `port` in the firewall (useful only with a non-loopback `host`).";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = loopback || apiKeyFile != null || lib.elem
          (lib.toLower (cfg.extraEnvironment.ML_OFFLOAD_ALLOW_UNAUTHENTICATED or "false"))
          [ "1" "true" "yes" "on" ];
        message = ''
          services.ml-offload: host ${cfg.host} is not loopback; set apiKeyFile (or
          extraEnvironment.ML_OFFLOAD_ALLOW_UNAUTHENTICATED = "true" if you really mean it).
        '';
      }
      {
        assertion = apiKeyFile == null || !(lib.hasPrefix builtins.storeDir apiKeyFile);
        message = ''
          services.ml-offload.apiKeyFile is in the world-readable Nix store; give a path
          outside it (a string, not a Nix path literal).
        '';
      }
      {
        assertion = upstreamKeyFile == null
          || !(lib.hasPrefix builtins.storeDir upstreamKeyFile);
        message = ''
          services.ml-offload.llamacppApiKeyFile is in the world-readable Nix store; give a
          path outside it (a string, not a Nix path literal).
        '';
      }
    ];

    warnings = lib.optional (cfg.openFirewall && loopback) ''
      services.ml-offload.openFirewall opens port ${toString cfg.port}, but host is ${cfg.host}.
    '';

    users.users.ml-offload = {
      isSystemUser = true;
      group = "ml-offload";
      home = stateDir;
      description = "ml-offload API service";
    };
    users.groups.ml-offload = { };

    networking.firewall.allowedTCPPorts = lib.optional cfg.openFirewall cfg.port;

    systemd.services.ml-offload-api = {
      description = "ml-offload OpenAI-compatible LLM API";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ] ++ lib.optional proxied cfg.llamacppService;
      wants = lib.optional proxied cfg.llamacppService;
      environment = settingsEnvironment // cfg.extraEnvironment;

      serviceConfig = {
        Type = "exec";
        ExecStart = "${cfg.package}/bin/ml-offload-server";
        User = "ml-offload";
        Group = "ml-offload";
        StateDirectory = "ml-offload";
        StateDirectoryMode = "0750";
        WorkingDirectory = stateDir;
        LoadCredential = lib.optional (apiKeyFile != null) "api-key:${apiKeyFile}"
          ++ lib.optional (upstreamKeyFile != null) "llamacpp-api-key:${upstreamKeyFile}";

        Restart = "on-failure";
        RestartSec = 5;
        # Exit status 2 is a configuration error: restarting cannot fix it.
        RestartPreventExitStatus = 2;
        TimeoutStopSec = 20;
        # Each client connection is an open file; the default soft limit (1024) would cap
        # the server's own ML_OFFLOAD_MAX_CONNECTIONS (1000) below itself.
        LimitNOFILE = 65536;

        # NVIDIA GPUs: /dev/nvidia0..N, nvidiactl, nvidia-uvm, nvidia-caps. PrivateDevices=
        # would hide them; DevicePolicy=closed keeps /dev/null & co. plus these.
        PrivateDevices = false;
        DevicePolicy = "closed";
        DeviceAllow = [
          "char-nvidiactl rw"
          "char-nvidia-frontend rw"
          "char-nvidia-uvm rw"
          "char-nvidia-caps rw"
        ];
        # Drivers that restrict /dev/nvidia* (NVreg_DeviceFileGID) give them to video.
        SupplementaryGroups = [ "video" ];

        # Hardening. Not MemoryDenyWriteExecute: CUDA's JIT and ctypes callbacks need it off.
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        CapabilityBoundingSet = "";
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectHostname = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        SystemCallArchitectures = "native";
        UMask = "0077";
      };
    };
  };
}
