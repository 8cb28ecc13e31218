"""The chat workspace: a markdown buffer per chat (``transcript``), the context attached to
a message (``context``), saved chats (``store``), one chat's requests (``session``) and the
chat actions (``chats``). The windows and keys are the Lua layer's
(``lua/ml-offload/chat/``)."""
